//! A real MCP server (the Python SDK's FastMCP over streamable HTTP, `mcp_server.py`) started
//! on a free loopback port and killed on drop.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct McpServer {
    child: Child,
    pub url: String,
    port: u16,
}

impl McpServer {
    pub async fn start() -> McpServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/mcp_server.py");
        let child = Command::new(super::python::python())
            .arg(script)
            .args(["--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the MCP test server");
        let server = McpServer { child, url: format!("http://127.0.0.1:{port}/mcp"), port };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "the MCP server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for McpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
