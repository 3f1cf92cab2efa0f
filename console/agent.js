// chatbox agent console (placeholder: the console is built in issue 16).
"use strict";
document.getElementById("status").textContent = "Not built yet.";
