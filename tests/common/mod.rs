//! Shared test harness: the real app on 127.0.0.1:0 with a fresh data folder, simulated
//! buyers on real sockets, and a client that speaks the supplier API.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use actix_web::dev::ServerHandle;
use leadex::config::Config;
use leadex::domain::Price;
use leadex::sim::{Behaviour, BidSpec, BuyerSim};
use leadex::startup::{Application, hash_key};
use serde_json::{Value, json};

/// Starts `actix_web::HttpServer::new($factory)` on 127.0.0.1:0 (one worker, no signal
/// handling) on the current actix system, for tests' own stand-in buyers and receivers;
/// evaluates to its address.
#[allow(unused_macros)]
macro_rules! serve_loopback {
    ($factory:expr) => {{
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let addr = listener.local_addr().expect("its address");
        let server = actix_web::HttpServer::new($factory)
            .workers(1)
            .disable_signals()
            .listen(listener)
            .expect("listens")
            .run();
        actix_rt::spawn(server);
        addr
    }};
}
#[allow(unused_imports)]
pub(crate) use serve_loopback;

/// Key of supplier `sup-1` (granted ACME1234 and SOLR0001).
pub const KEY: &str = "test-key-supplier-one";
/// Key of supplier `sup-2` (granted OTHR0001 only).
pub const OTHER_KEY: &str = "test-key-supplier-two";

pub struct TestApp {
    pub addr: std::net::SocketAddr,
    pub base: String,
    pub client: reqwest::Client,
    pub handle: ServerHandle,
    pub data: PathBuf,
    running: Option<actix_rt::task::JoinHandle<std::io::Result<()>>>,
}

/// Folders made by `data_dir`, removed when the test process exits: a test that restarts
/// the exchange reuses its folder, so no one value owns it, and each holds a write-ahead log
/// of several MiB, too much to leave behind.
static DATA_DIRS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

extern "C" fn remove_data_dirs() {
    if let Ok(dirs) = DATA_DIRS.lock() {
        for dir in dirs.iter() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A fresh temporary data folder kept for the test's life (tests that restart reuse it).
pub fn data_dir() -> PathBuf {
    static AT_EXIT: std::sync::Once = std::sync::Once::new();
    AT_EXIT.call_once(|| {
        // SAFETY: registers a plain function with no arguments to run at process exit.
        unsafe {
            libc::atexit(remove_data_dirs);
        }
    });
    let dir = tempfile::Builder::new()
        .prefix("leadex-test-")
        .tempdir()
        .expect("tempdir")
        .keep();
    DATA_DIRS.lock().expect("data dirs").push(dir.clone());
    dir
}

/// A buyer simulator bidding `bid` (`"12.50"`, `"10-20"`, `"none"`) after `latency_ms`.
pub fn sim(bid: &str, latency_ms: u64) -> BuyerSim {
    sim_with(Behaviour {
        bid: BidSpec::parse(bid).expect("bid"),
        ping_latency_ms: (latency_ms, latency_ms),
        post_latency_ms: (0, 0),
        reject_rate: 0.0,
    })
}

/// A buyer that bids `bid` at once and refuses every post.
pub fn refusing_sim(bid: &str) -> BuyerSim {
    sim_with(Behaviour {
        bid: BidSpec::parse(bid).unwrap(),
        ping_latency_ms: (0, 0),
        post_latency_ms: (0, 0),
        reject_rate: 1.0,
    })
}

pub fn sim_with(behaviour: Behaviour) -> BuyerSim {
    BuyerSim::start("127.0.0.1:0", behaviour, 1).expect("buyer simulator")
}

/// A buyer on HTTPS: a TLS endpoint on 127.0.0.1:0 with a certificate for 127.0.0.1 and
/// localhost signed by its own CA, offering HTTP/2 and HTTP/1.1 by ALPN, that passes each
/// connection's bytes on to the plain simulator at `target`.
pub struct TlsFront {
    pub addr: std::net::SocketAddr,
    /// The CA that signed its certificate, as PEM.
    pub ca_pem: String,
    /// The protocol each completed handshake settled on (`h2`, `http/1.1`).
    handshakes: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl TlsFront {
    pub fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    pub fn handshakes(&self) -> Vec<String> {
        self.handshakes.lock().expect("handshakes").clone()
    }
}

/// Starts a `TlsFront` for `target` on the current actix system.
pub fn tls_front(target: std::net::SocketAddr) -> TlsFront {
    use tokio_rustls::rustls;
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "leadex test buyer CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA certificate");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("names")
        .signed_by(&key, &ca)
        .expect("certificate");
    let mut tls = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
    )
    .expect("server certificate");
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    listener.set_nonblocking(true).expect("non-blocking");
    let addr = listener.local_addr().expect("its address");
    let handshakes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = handshakes.clone();
    actix_rt::spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            actix_rt::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let alpn = tls.get_ref().1.alpn_protocol().unwrap_or(b"none");
                seen.lock()
                    .expect("handshakes")
                    .push(String::from_utf8_lossy(alpn).into_owned());
                if let Ok(mut plain) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                }
            });
        }
    });
    TlsFront {
        addr,
        ca_pem: ca.pem(),
        handshakes,
    }
}

/// The value of one series in the Prometheus page, e.g. `name{buyer="x"}`.
pub fn metric(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

pub fn price(text: &str) -> Price {
    Price::parse_decimal(text).unwrap()
}

/// `[[buyers]]` for a ping-post buyer on `sim`, in campaign `acme-auto`, plus `extra` lines.
pub fn ping_buyer(id: &str, sim: &BuyerSim, extra: &str) -> String {
    format!(
        "\n[[buyers]]\nid = \"{id}\"\ncampaigns = [\"acme-auto\"]\nping_url = \"{}\"\npost_url = \"{}\"\n{extra}\n",
        sim.url("/ping"),
        sim.url("/post")
    )
}

/// `[[buyers]]` for a direct-post buyer on `sim` at `fixed_price`.
pub fn direct_buyer(id: &str, sim: &BuyerSim, fixed_price: &str, extra: &str) -> String {
    format!(
        "\n[[buyers]]\nid = \"{id}\"\ncampaigns = [\"acme-auto\"]\npost_url = \"{}\"\nfixed_price = {fixed_price}\n{extra}\n",
        sim.url("/post")
    )
}

/// The standard test config: sellers ACME1234 (slug `acme`), SOLR0001, OTHR0001; suppliers
/// `sup-1` (KEY) and `sup-2` (OTHER_KEY); campaign `acme-auto` ("Auto Insurance", with
/// `campaign_extra` lines) and `acme-solar`; then `buyers`.
pub fn config(data: &Path, campaign_extra: &str, buyers: &str) -> String {
    config_with(data, "", campaign_extra, buyers)
}

/// As `config`, with `rate_limit` lines (e.g. `requests = 5`).
pub fn config_with(data: &Path, rate_limit: &str, campaign_extra: &str, buyers: &str) -> String {
    let rate_limit = if rate_limit.is_empty() {
        "requests = 100000\nwindow_secs = 60".to_owned()
    } else {
        rate_limit.to_owned()
    };
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
workers = 2
shutdown_grace_secs = 10

[storage]
backend = "embedded"
path = "{data}"

[rate_limit]
{rate_limit}

[[sellers]]
code = "ACME1234"
slug = "acme"

[[sellers]]
code = "SOLR0001"
slug = "solar-co"

[[sellers]]
code = "OTHR0001"
slug = "other"

[[suppliers]]
id = "sup-1"
sellers = ["ACME1234", "SOLR0001"]
api_key_sha256 = ["{k1}"]

[[suppliers]]
id = "sup-2"
sellers = ["OTHR0001"]
api_key_sha256 = ["{k2}"]

[[campaigns]]
id = "acme-solar"
seller = "ACME1234"
category = "Solar"

[[campaigns]]
id = "acme-auto"
seller = "ACME1234"
category = "Auto Insurance"
ping_timeout_ms = 300
post_timeout_ms = 1000
{campaign_extra}
{buyers}
"#,
        data = data.display(),
        k1 = hash_key(KEY),
        k2 = hash_key(OTHER_KEY),
    )
}

/// A valid lead for `acme-auto`.
pub fn lead() -> Value {
    json!({
        "seller": "ACME1234",
        "category": "Auto Insurance",
        "firstName": "John",
        "lastName": "Doe",
        "email": "john.doe@email.com",
        "phone": "555-123-4567",
        "state": "TX",
        "zip": "75001",
        "city": "Dallas"
    })
}

impl TestApp {
    pub async fn spawn(config_text: &str) -> TestApp {
        TestApp::spawn_with_clock(config_text, leadex::clock::Clock::system()).await
    }

    /// As `spawn`, with the clock the marketplace rules read (a manual one the test moves).
    pub async fn spawn_with_clock(config_text: &str, clock: leadex::clock::Clock) -> TestApp {
        let config = Config::from_toml(config_text).expect("test config is valid");
        let data = config.storage.path.clone();
        let app = Application::build_with_clock(config, None, clock)
            .await
            .expect("app builds");
        let addr = app.addr();
        let handle = app.handle();
        let running = actix_rt::spawn(app.run_until_stopped());
        TestApp {
            addr,
            base: format!("http://{addr}"),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            handle,
            data,
            running: Some(running),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs a JSON lead with `key`; returns status, headers and the JSON body.
    pub async fn post_lead_as(
        &self,
        key: &str,
        body: &Value,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let response = self
            .client
            .post(self.url("/api/leads"))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .expect("request sent");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        (status, headers, json)
    }

    /// POSTs a JSON lead and returns the status and the body exactly as sent.
    pub async fn post_lead_raw(&self, body: &Value) -> (u16, String) {
        let response = self
            .client
            .post(self.url("/api/leads"))
            .bearer_auth(KEY)
            .json(body)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    pub async fn post_lead(&self, body: &Value) -> (u16, Value) {
        let (status, _, json) = self.post_lead_as(KEY, body).await;
        (status, json)
    }

    pub async fn get_lead(&self, key: &str, lead_id: &str) -> (u16, Value) {
        let response = self
            .client
            .get(self.url(&format!("/api/leads/{lead_id}")))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    /// `GET /ops/leads/{lead_id}` with `token` as the bearer, if any.
    pub async fn get_ops_lead(&self, token: Option<&str>, lead_id: &str) -> (u16, Value) {
        self.get_ops(token, &format!("/ops/leads/{lead_id}")).await
    }

    /// `GET path` with `token` as the bearer, if any.
    pub async fn get_ops(&self, token: Option<&str>, path: &str) -> (u16, Value) {
        let mut request = self.client.get(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Graceful stop: in-flight requests finish, storage is closed.
    pub async fn stop(mut self) {
        self.handle.stop(true).await;
        if let Some(running) = self.running.take() {
            running.await.expect("app task").expect("app ran");
        }
    }
}

impl TestApp {
    /// As `spawn`, also handing out the app's store (to close it and watch the node go unready).
    pub async fn spawn_with_store(
        config_text: &str,
    ) -> (TestApp, std::sync::Arc<dyn leadex::storage::LeadStore>) {
        let config = Config::from_toml(config_text).expect("test config is valid");
        let data = config.storage.path.clone();
        let app = Application::build(config, None).await.expect("app builds");
        let store = app.store();
        let addr = app.addr();
        let handle = app.handle();
        let running = actix_rt::spawn(app.run_until_stopped());
        let test_app = TestApp {
            addr,
            base: format!("http://{addr}"),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            handle,
            data,
            running: Some(running),
        };
        (test_app, store)
    }
}
