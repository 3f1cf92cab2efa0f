// chatbox chat widget (placeholder: the widget is built in issue 16).
"use strict";
