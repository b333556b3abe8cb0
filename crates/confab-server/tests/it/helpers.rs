//! `spawn_app()`: a confab on port 0, embedded backends in its own temp dir, and a client.

use std::path::Path;

use axum::Router;
use confab_server::cli::Role;
use confab_server::config::{Config, Environment, Secret};
use confab_server::startup::{Application, Overrides};
use confab_server::state::AppState;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct TestApp {
    pub address: std::net::SocketAddr,
    pub state: AppState,
    pub client: reqwest::Client,
    pub shutdown: CancellationToken,
    pub server: JoinHandle<anyhow::Result<()>>,
    pub data_dir: std::path::PathBuf,
    _data: tempfile::TempDir,
}

/// The configuration every test starts from: production-like (`test` environment), a fixed
/// JWT secret, port 0, a private data dir.
pub fn test_config(data_dir: &Path) -> Config {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().expect("a literal address");
    config.server.environment = Environment::Test;
    data_dir.clone_into(&mut config.server.data_dir);
    config.auth.jwt_secret = Some(Secret::new("test-secret-test-secret-test-secret!"));
    config
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}, Overrides::default()).await
}

pub async fn spawn_app_with_routes(routes: Router<AppState>) -> TestApp {
    spawn_app_with(
        |_| {},
        Overrides {
            routes,
            ..Overrides::default()
        },
    )
    .await
}

pub async fn spawn_app_with(configure: impl FnOnce(&mut Config), overrides: Overrides) -> TestApp {
    let data = tempfile::tempdir().expect("a temp dir");
    let mut config = test_config(data.path());
    configure(&mut config);
    config.validate().expect("the test configuration is valid");
    let app = Application::build_with(config, Role::All, overrides)
        .await
        .expect("the app builds");
    let address = app.local_addr();
    let state = app.state().clone();
    let shutdown = app.shutdown_token();
    let server = tokio::spawn(app.run_until_stopped());
    TestApp {
        address,
        state,
        client: reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("a client"),
        shutdown,
        server,
        data_dir: data.path().to_owned(),
        _data: data,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("the request is answered")
    }
}

/// Asserts the SPEC error shape and returns the body.
pub async fn assert_error(
    response: reqwest::Response,
    status: u16,
    code: &str,
) -> serde_json::Value {
    assert_eq!(response.status().as_u16(), status, "status");
    assert!(
        response.headers()[reqwest::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let header_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: serde_json::Value = response.json().await.expect("a JSON body");
    assert_eq!(body["code"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(body["details"].is_object(), "{body}");
    assert_eq!(body["requestId"], header_id.as_str(), "{body}");
    let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
    assert_eq!(
        keys.len(),
        4,
        "exactly code, message, details, requestId: {body}"
    );
    body
}

/// A `redis-server` of the test's own on a free port, to kill and restart at will.
pub struct TempRedis {
    pub port: u16,
    password: Option<String>,
    /// TLS only (a throwaway self-signed certificate), when set.
    tls: bool,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl TempRedis {
    /// `None` (after a skip line) when `redis-server` is not installed; under `CI=true` that
    /// is a failure.
    pub fn start(password: Option<&str>) -> Option<Self> {
        Self::start_with(password, false)
    }

    /// A TLS-only server; `None` (after a skip line) when `openssl` is missing outside CI.
    pub fn start_tls() -> Option<Self> {
        Self::start_with(None, true)
    }

    fn start_with(password: Option<&str>, tls: bool) -> Option<Self> {
        let installed = std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !installed {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "redis-server is not installed; CI needs it for the outage tests"
            );
            eprintln!("SKIP: redis-server is not installed");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut redis = Self {
            port,
            password: password.map(str::to_owned),
            tls,
            dir: tempfile::tempdir().expect("a temp dir"),
            child: None,
        };
        if tls {
            // A throwaway CA, and a server certificate for localhost signed by it.
            let dir = redis.dir.path();
            std::fs::write(
                dir.join("san.ext"),
                "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
            )
            .expect("a temp file");
            let openssl = |args: &[&str]| {
                std::process::Command::new("openssl")
                    .args(args)
                    .current_dir(dir)
                    .output()
                    .is_ok_and(|o| o.status.success())
            };
            let made = openssl(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=confab-test-ca",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
            ]) && openssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=localhost",
                "-keyout",
                "key.pem",
                "-out",
                "server.csr",
            ]) && openssl(&[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                "san.ext",
                "-out",
                "cert.pem",
            ]);
            if !made {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "openssl is needed for the TLS test"
                );
                eprintln!("SKIP: openssl is not installed");
                return None;
            }
        }
        redis.restart();
        Some(redis)
    }

    pub fn url(&self) -> String {
        if self.tls {
            return format!("rediss://localhost:{}", self.port);
        }
        match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// Starts it (again), empty, on the same port; returns once it accepts connections.
    pub fn restart(&mut self) {
        let mut command = std::process::Command::new("redis-server");
        let port = self.port.to_string();
        if self.tls {
            command
                .args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port,
                    "--tls-auth-clients",
                    "no",
                ])
                .args(["--tls-cert-file", "cert.pem", "--tls-key-file", "key.pem"])
                .args(["--tls-ca-cert-file", "ca.pem"])
                .current_dir(self.dir.path());
        } else {
            command.args(["--port", &port]);
        }
        command
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        self.child = Some(command.spawn().expect("redis-server starts"));
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "redis-server did not listen"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// The certificate a client must trust to talk to a TLS server.
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for TempRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

pub use confab_adapters::testing::Proxy;
