//! Operations, each against the real tools: promtool checks the Prometheus config and runs the
//! alert unit tests, a real Prometheus scrapes a real exchange process, every dashboard and
//! alert expression names only metrics the app exports, SIGTERM lets auctions in flight finish
//! and be stored, readiness follows storage, and debug logs carry no personal field.
//!
//! The exchange runs as its own process (`leadex serve`) wherever metrics or signals are
//! checked, so counts are not mixed with other tests' apps. Every child is killed on drop.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;
use leadex::sim::{Behaviour, BidSpec, BuyerSim};
use leadex::storage::wal::BLOCK;
use serde_json::{Value, json};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// A child process killed (and reaped) when dropped, even when the test panics.
struct Guard(Option<Child>);

impl Guard {
    fn pid(&self) -> i32 {
        self.0.as_ref().expect("running").id() as i32
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let sent = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(sent, 0, "signal {signal} sent");
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.0
            .as_mut()
            .expect("running")
            .try_wait()
            .expect("try_wait")
    }

    /// Waits (at most 20 s) for the line with `marker` in the process's `log` and returns the
    /// address it names; panics if the process exits first.
    async fn listening(&mut self, log: &Path, marker: &str) -> SocketAddr {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if let Some(addr) = text
                .lines()
                .find(|l| l.contains(marker))
                .and_then(listening_addr)
            {
                return addr;
            }
            if let Some(status) = self.exited() {
                panic!("exited at start-up ({status}):\n{text}");
            }
            assert!(Instant::now() < until, "did not start:\n{text}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (at most `limit`) for the process to exit.
    async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A `leadex serve` process on 127.0.0.1, port picked by the OS, stderr kept in a file.
struct Exchange {
    process: Guard,
    addr: SocketAddr,
    base: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Exchange {
    async fn start(config_text: &str, log_format: &str, rust_log: &str) -> Exchange {
        let dir = tempfile::Builder::new()
            .prefix("leadex-ops-")
            .tempdir()
            .unwrap();
        let config = dir.path().join("leadex.toml");
        std::fs::write(&config, config_text).unwrap();
        let log = dir.path().join("stderr.log");
        let child = Command::new(env!("CARGO_BIN_EXE_leadex"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .args(["--listen", "127.0.0.1:0", "--log-format", log_format])
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("leadex binary starts");
        let mut process = Guard(Some(child));
        let addr = process.listening(&log, "leadex listening").await;
        Exchange {
            process,
            addr,
            base: format!("http://{addr}"),
            log,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    async fn metrics(&self, client: &reqwest::Client) -> String {
        client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// `127.0.0.1:PORT` from the start-up line, in text or JSON format.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let at = line.find("127.0.0.1:")?;
    let rest = &line[at + "127.0.0.1:".len()..];
    let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
    format!("127.0.0.1:{port}").parse().ok()
}

async fn post_lead(
    client: &reqwest::Client,
    base: &str,
    body: &Value,
) -> reqwest::Result<(u16, Value)> {
    let response = client
        .post(format!("{base}/api/leads"))
        .bearer_auth(KEY)
        .json(body)
        .send()
        .await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await?))
}

/// A campaign with roomy deadlines for slow buyers: `acme-slow` ("Home Warranty"), pings
/// answered within 2 s, posts within 6 s; plus a buyer on `sim` for it.
fn slow_campaign_and_buyer(sim: &BuyerSim) -> String {
    format!(
        r#"
[[campaigns]]
id = "acme-slow"
seller = "ACME1234"
category = "Home Warranty"
ping_timeout_ms = 2000
post_timeout_ms = 6000

[[buyers]]
id = "slow-buyer"
campaigns = ["acme-slow"]
ping_url = "{}"
post_url = "{}"
"#,
        sim.url("/ping"),
        sim.url("/post")
    )
}

fn slow_lead() -> Value {
    let mut lead = lead();
    lead["category"] = json!("Home Warranty");
    lead
}

fn slow_sim(ping_ms: u64, post_ms: u64) -> BuyerSim {
    sim_with(Behaviour {
        bid: BidSpec::parse("15").unwrap(),
        ping_latency_ms: (ping_ms, ping_ms),
        post_latency_ms: (post_ms, post_ms),
        reject_rate: 0.0,
    })
}

/// Each lead is stored as sold to `slow-buyer` at 15.00.
async fn assert_sold_to_slow_buyer(
    client: &reqwest::Client,
    exchange: &Exchange,
    lead_ids: &[String],
) {
    for lead_id in lead_ids {
        let response = client
            .get(exchange.url(&format!("/api/leads/{lead_id}")))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200, "{lead_id} stored");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["status"], "sold", "{body}");
        assert_eq!(body["buyer_ids"], json!(["slow-buyer"]), "{body}");
        assert_eq!(body["price"], json!(15.0), "{body}");
    }
}

/// Waits (bounded) until `done` holds.
async fn eventually(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------
// promtool

fn promtool(args: &[&str]) -> String {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(repo("deploy/prometheus"))
        .output()
        .expect("promtool is installed (scripts/test.sh installs the prometheus package)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn promtool_accepts_the_config_and_rules_and_every_alert_unit_test_passes() {
    let config = promtool(&["check", "config", "prometheus.yml"]);
    assert!(config.contains("SUCCESS"), "{config}");
    let rules = promtool(&["check", "rules", "alerts.yml"]);
    assert!(rules.contains("SUCCESS: 10 rules found"), "{rules}");
    let tests = promtool(&["test", "rules", "alerts_test.yml"]);
    assert!(tests.contains("SUCCESS"), "{tests}");

    // Every alert has a unit test that expects it to fire.
    let alerts = alert_names();
    let test_text = std::fs::read_to_string(repo("deploy/prometheus/alerts_test.yml")).unwrap();
    for alert in &alerts {
        assert!(
            unit_test_fires(&test_text, alert),
            "alert {alert} has no promtool unit test in which it fires"
        );
    }
    assert_eq!(alerts.len(), 10, "{alerts:?}");
}

/// `alert:` names of alerts.yml.
fn alert_names() -> Vec<String> {
    alert_rules().into_iter().map(|(name, _)| name).collect()
}

/// (alert name, expression) of every rule in alerts.yml. The file is plain YAML with block
/// scalars; this reads the two keys it needs without a YAML crate.
fn alert_rules() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo("deploy/prometheus/alerts.yml")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut rules = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if let Some(name) = lines[i].trim().strip_prefix("- alert: ") {
            let name = name.trim().to_owned();
            let mut j = i + 1;
            while !lines[j].trim_start().starts_with("expr:") {
                j += 1;
            }
            let expr_line = lines[j].trim_start().trim_start_matches("expr:").trim();
            let expr = if expr_line == "|" {
                let indent = lines[j].len() - lines[j].trim_start().len();
                let mut body = Vec::new();
                j += 1;
                while j < lines.len()
                    && (lines[j].trim().is_empty()
                        || lines[j].len() - lines[j].trim_start().len() > indent)
                {
                    body.push(lines[j].trim());
                    j += 1;
                }
                body.join("\n")
            } else {
                expr_line.to_owned()
            };
            rules.push((name, expr));
            i = j;
        } else {
            i += 1;
        }
    }
    rules
}

/// Whether alerts_test.yml has a case where `alert` is expected to fire (a non-empty
/// `exp_alerts` list right under its `alertname`).
fn unit_test_fires(tests: &str, alert: &str) -> bool {
    let lines: Vec<&str> = tests.lines().collect();
    lines.iter().enumerate().any(|(i, line)| {
        line.trim() == format!("alertname: {alert}")
            && lines.get(i + 1).is_some_and(|l| l.trim() == "exp_alerts:")
            && lines
                .get(i + 2)
                .is_some_and(|l| l.trim().starts_with("- exp_labels:"))
    })
}

// ---------------------------------------------------------------------------------------
// PromQL in dashboards and alerts

/// The uid the provisioned datasource has and every dashboard panel names.
const DATASOURCE_UID: &str = "prometheus";

#[test]
fn grafana_provisioning_loads_the_dashboards_from_the_prometheus_datasource() {
    let datasource = std::fs::read_to_string(repo(
        "deploy/grafana/provisioning/datasources/prometheus.yml",
    ))
    .unwrap();
    assert!(
        datasource.contains(&format!("uid: {DATASOURCE_UID}\n"))
            && datasource.contains("type: prometheus\n"),
        "{datasource}"
    );
    let provider =
        std::fs::read_to_string(repo("deploy/grafana/provisioning/dashboards/leadex.yml")).unwrap();
    assert!(provider.contains("type: file\n"), "{provider}");
    assert!(
        provider.contains("path: /var/lib/grafana/dashboards/leadex\n"),
        "{provider}"
    );
    // Every dashboard has its own uid and title, and is reachable from the others' links.
    let mut uids = HashSet::new();
    for file in ["exchange.json", "buyers.json", "capacity.json"] {
        let text =
            std::fs::read_to_string(repo(&format!("deploy/grafana/dashboards/{file}"))).unwrap();
        let dashboard: Value = serde_json::from_str(&text).unwrap();
        assert!(
            uids.insert(dashboard["uid"].as_str().unwrap().to_owned()),
            "{file}"
        );
        assert!(
            dashboard["title"]
                .as_str()
                .unwrap()
                .starts_with("leadex / "),
            "{file}"
        );
        assert_eq!(dashboard["tags"], json!(["leadex"]), "{file}");
        assert_eq!(dashboard["links"][0]["tags"], json!(["leadex"]), "{file}");
    }
    // The datasource of every panel is the provisioned one.
    assert!(dashboard_exprs().len() > 30);
}

/// Every PromQL expression of the dashboards: (where, expression). Template variable
/// queries `label_values(metric, label)` contribute `metric`.
fn dashboard_exprs() -> Vec<(String, String)> {
    let mut exprs = Vec::new();
    let dir = repo("deploy/grafana/dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["buyers.json", "capacity.json", "exchange.json"]);
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap())
            .unwrap_or_else(|e| panic!("{name} is not JSON: {e}"));
        let mut panels = 0;
        for panel in dashboard["panels"].as_array().unwrap() {
            if panel["type"] != "row" {
                assert_eq!(
                    panel["datasource"]["uid"], DATASOURCE_UID,
                    "{name}: {}",
                    panel["title"]
                );
            }
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().expect("every target has an expr");
                exprs.push((format!("{name}: {}", panel["title"]), expr.to_owned()));
                panels += 1;
            }
        }
        assert!(panels >= 10, "{name} has only {panels} queries");
        for variable in dashboard["templating"]["list"].as_array().unwrap() {
            let query = variable["query"]["query"].as_str().unwrap();
            let inner = query
                .strip_prefix("label_values(")
                .and_then(|q| q.split(',').next())
                .unwrap_or_else(|| panic!("{name}: variable query {query}"));
            exprs.push((
                format!("{name}: variable {}", variable["name"]),
                inner.trim().to_owned(),
            ));
        }
    }
    exprs
}

/// Grafana's variables replaced by values Prometheus accepts, to run the expression as is.
fn as_plain_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$instance", ".*")
        .replace("$campaign", ".*")
        .replace("$buyer", ".*")
}

const AGGREGATIONS: [&str; 12] = [
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
];
const KEYWORDS: [&str; 10] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
];

/// Metric names an expression selects: identifiers outside strings, label matchers and
/// ranges that are not functions, aggregations, keywords, label lists or `offset` durations.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let skip_to = |i: usize, close: char| {
        let mut j = i + 1;
        while j < chars.len() && chars[j] != close {
            j += 1;
        }
        j + 1
    };
    let next_non_space = |mut j: usize| {
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        j
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => i = skip_to(i, c),
            '{' => i = skip_to(i, '}'),
            '[' => i = skip_to(i, ']'),
            c if c.is_ascii_digit() || c == '.' => {
                // A number or a duration (`15m`): digits then letters.
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' || c == '$' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric()
                        || chars[i] == '_'
                        || chars[i] == ':'
                        || chars[i] == '$')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let after = next_non_space(i);
                let followed_by_paren = chars.get(after) == Some(&'(');
                if KEYWORDS.contains(&word.as_str()) {
                    // A label list follows grouping and matching keywords.
                    if followed_by_paren
                        && !matches!(word.as_str(), "and" | "or" | "unless" | "bool")
                    {
                        i = skip_to(after, ')');
                    }
                } else if word == "offset" || word.starts_with('$') {
                    // `offset 15m`: the duration is skipped as a number.
                } else if followed_by_paren || AGGREGATIONS.contains(&word.as_str()) {
                    // A function call or an aggregation.
                } else {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

#[test]
fn the_promql_reader_finds_metric_names_and_nothing_else() {
    let expr = r#"histogram_quantile(0.99, sum by (campaign, le) (rate(leadex_a_bucket{x="y z", le!="1"}[$__rate_interval])))
        > on (campaign) group_left max by (campaign) (leadex_b{c=~"$campaign"}) and leadex_c offset 15m
        or sum without (instance) (leadex_d) / 100 and time() - leadex_e unless up{job="leadex"} == bool 0"#;
    let names: Vec<String> = metric_names(expr).into_iter().collect();
    assert_eq!(
        names,
        [
            "leadex_a_bucket",
            "leadex_b",
            "leadex_c",
            "leadex_d",
            "leadex_e",
            "up"
        ]
    );
}

/// Names of every sample the exposition text holds (`_bucket`, `_sum`, `_count` included).
fn exported_names(exposition: &str) -> HashSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or_default().to_owned())
        .collect()
}

/// The value of the first sample whose line starts with `prefix`.
fn sample(exposition: &str, prefix: &str) -> f64 {
    exposition
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {prefix} in:\n{exposition}"))
}

/// Starts the exchange with one bidding buyer, sells 3 leads in `acme-auto`, leaves 2
/// pending in `acme-solar` (no buyers), and has one refused for a bad key.
async fn exchange_with_traffic(buyer: &BuyerSim) -> Exchange {
    let data = data_dir();
    let exchange = Exchange::start(
        &config(&data, "", &ping_buyer("buyer-a", buyer, "")),
        "text",
        "info",
    )
    .await;
    let client = http();
    for _ in 0..3 {
        let (status, body) = post_lead(&client, &exchange.base, &lead()).await.unwrap();
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("sold")),
            "{body}"
        );
    }
    let mut solar = lead();
    solar["category"] = json!("Solar");
    for _ in 0..2 {
        let (status, body) = post_lead(&client, &exchange.base, &solar).await.unwrap();
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("pending")),
            "{body}"
        );
    }
    let refused = client
        .post(exchange.url("/api/leads"))
        .bearer_auth("not-a-key")
        .json(&lead())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 401);
    exchange
}

#[actix_web::test]
async fn every_dashboard_and_alert_expression_names_only_metrics_the_app_exports() {
    let buyer = sim("12", 1);
    let exchange = exchange_with_traffic(&buyer).await;
    let exposition = exchange.metrics(&http()).await;
    let exported = exported_names(&exposition);

    let mut exprs = dashboard_exprs();
    exprs.extend(
        alert_rules()
            .into_iter()
            .map(|(name, expr)| (format!("alerts.yml: {name}"), expr)),
    );
    let mut used = BTreeSet::new();
    for (place, expr) in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{place}: no metric in {expr}");
        for name in names {
            // `up` is written by Prometheus for every scrape target, not by the app.
            assert!(
                name == "up" || exported.contains(&name),
                "{place} uses {name}, which the app does not export.\nexpr: {expr}"
            );
            used.insert(name);
        }
    }
    // The dashboards cover the contract's metrics and the process metrics.
    for name in [
        "leadex_leads_total",
        "leadex_auction_duration_seconds_bucket",
        "leadex_buyer_ping_duration_seconds_bucket",
        "leadex_buyer_pings_total",
        "leadex_buyer_posts_total",
        "leadex_sold_value_total",
        "leadex_rate_limited_total",
        "leadex_http_requests_total",
        "leadex_http_request_duration_seconds_bucket",
        "leadex_auctions_in_flight",
        "leadex_buyer_breaker_state",
        "leadex_buyer_skipped_total",
        "leadex_storage_write_duration_seconds_bucket",
        "leadex_storage_errors_total",
        "leadex_rate_limit_check_duration_seconds_bucket",
        "leadex_rate_limit_backend_errors_total",
        "leadex_buyer_post_value_total",
        "leadex_process_cpu_seconds_total",
        "leadex_process_resident_memory_bytes",
    ] {
        assert!(used.contains(name), "no dashboard or alert shows {name}");
    }

    // Process metrics are real readings of this process.
    assert!(sample(&exposition, "leadex_process_resident_memory_bytes ") > 1_000_000.0);
    assert!(sample(&exposition, "leadex_process_open_fds ") >= 3.0);
    assert!(sample(&exposition, "leadex_process_threads ") >= 2.0);
    // CPU time counts in 10 ms ticks: a young, idle process may still be at 0.
    let cpu = sample(&exposition, "leadex_process_cpu_seconds_total ");
    assert!(cpu.is_finite() && cpu >= 0.0, "{cpu}");
    let started = sample(&exposition, "leadex_process_start_time_seconds ");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        started <= now + 1.0 && started > now - 120.0,
        "start time {started} vs now {now}"
    );
    assert_eq!(sample(&exposition, "leadex_storage_up "), 1.0);
    assert_eq!(
        sample(
            &exposition,
            "leadex_rate_limit_backend_up{backend=\"memory\"} "
        ),
        1.0
    );
    assert_eq!(
        sample(
            &exposition,
            "leadex_campaign_auction_deadline_seconds{campaign=\"acme-auto\"} "
        ),
        1.3
    );
    // Counters of configured campaigns and buyers exist at 0 before any traffic on them.
    assert_eq!(
        sample(
            &exposition,
            "leadex_buyer_pings_total{buyer=\"buyer-a\",outcome=\"timeout\"} "
        ),
        0.0
    );
    assert_eq!(
        sample(
            &exposition,
            "leadex_leads_total{campaign=\"acme-auto\",outcome=\"sold\"} "
        ),
        3.0
    );
    assert_eq!(
        sample(
            &exposition,
            "leadex_sold_value_total{campaign=\"acme-auto\"} "
        ),
        3600.0,
        "3 leads at 12.00, in cents"
    );
}

// ---------------------------------------------------------------------------------------
// A real Prometheus scraping a real exchange

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Prometheus {
    _process: Guard,
    base: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::Builder::new()
            .prefix("leadex-prom-")
            .tempdir()
            .unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: leadex\n    static_configs:\n      - targets: ['{target}']\n",
                repo("deploy/prometheus/alerts.yml").display()
            ),
        )
        .unwrap();
        let port = free_port();
        let log = dir.path().join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("prometheus is installed (scripts/test.sh installs it)");
        let mut process = Guard(Some(child));
        let base = format!("http://127.0.0.1:{port}");
        let client = http();
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = client.get(format!("{base}/-/ready")).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            if let Some(status) = process.exited() {
                panic!(
                    "prometheus exited ({status}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < until, "prometheus did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Prometheus {
            _process: process,
            base,
            _dir: dir,
        }
    }

    /// Runs an instant query; `Err` carries Prometheus' error for a bad expression.
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let response: Value = http()
            .get(format!("{}/api/v1/query", self.base))
            .query(&[("query", expr)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if response["status"] == "success" {
            Ok(response["data"]["result"]
                .as_array()
                .cloned()
                .unwrap_or_default())
        } else {
            Err(response["error"].to_string())
        }
    }
}

#[actix_web::test]
async fn prometheus_scrapes_leads_total_by_campaign_and_outcome() {
    let buyer = sim("12", 1);
    let exchange = exchange_with_traffic(&buyer).await;
    let prometheus = Prometheus::start(exchange.addr).await;

    // Scraped every second: wait (bounded) for the counts sent above.
    let wanted = [("acme-auto", "sold", "3"), ("acme-solar", "pending", "2")];
    let until = Instant::now() + Duration::from_secs(30);
    let series = loop {
        let series = prometheus.query("leadex_leads_total").await.unwrap();
        let found = wanted.iter().all(|(campaign, outcome, value)| {
            series.iter().any(|s| {
                s["metric"]["campaign"] == *campaign
                    && s["metric"]["outcome"] == *outcome
                    && s["value"][1] == *value
            })
        });
        if found {
            break series;
        }
        assert!(
            Instant::now() < until,
            "Prometheus never saw the leads: {series:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    for s in &series {
        let metric = s["metric"].as_object().unwrap();
        let mut labels: Vec<&str> = metric.keys().map(String::as_str).collect();
        labels.sort();
        assert_eq!(
            labels,
            ["__name__", "campaign", "instance", "job", "outcome"],
            "{s}"
        );
        assert_eq!(metric["job"], "leadex");
        assert_eq!(metric["instance"], exchange.addr.to_string().as_str());
        assert!(["sold", "pending"].contains(&metric["outcome"].as_str().unwrap()));
    }
    // Configured but idle series are there at 0.
    assert!(
        series
            .iter()
            .any(|s| s["metric"]["campaign"] == "acme-solar"
                && s["metric"]["outcome"] == "sold"
                && s["value"][1] == "0")
    );
    let up = prometheus.query("up{job=\"leadex\"}").await.unwrap();
    assert_eq!(up[0]["value"][1], "1", "{up:?}");

    // Every dashboard and alert expression is valid PromQL for this Prometheus, and the
    // rules file loads into it.
    for (place, expr) in dashboard_exprs() {
        let plain = as_plain_promql(&expr);
        if let Err(e) = prometheus.query(&plain).await {
            panic!("{place}: Prometheus refuses {plain}: {e}");
        }
    }
    for (name, expr) in alert_rules() {
        if let Err(e) = prometheus.query(&expr).await {
            panic!("alert {name}: Prometheus refuses {expr}: {e}");
        }
    }
    let rules: Value = http()
        .get(format!("{}/api/v1/rules", prometheus.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let loaded = rules["data"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(loaded, 10, "{rules}");
}

// ---------------------------------------------------------------------------------------
// Health

#[actix_web::test]
async fn readyz_follows_storage_and_healthz_stays_alive() {
    // A buyer that never bids: the lead below stays pending, which only storage can keep.
    let buyer = sim("none", 0);
    let (app, store) =
        TestApp::spawn_with_store(&config(&data_dir(), "", &ping_buyer("a", &buyer, ""))).await;

    let response = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"status": "ready", "storage": "ok", "rate_limit": "ok (memory)", "coordination": "ok (memory)"})
    );

    store.close().await.unwrap();
    let response = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(
        response.status().as_u16(),
        503,
        "storage down makes the node unready"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "unavailable", "{body}");
    assert_eq!(body["storage"], "storage is closed", "{body}");
    assert_eq!(body["rate_limit"], "ok (memory)", "{body}");

    let response = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200, "alive while unready");
    let metrics = app.metrics().await;
    assert_eq!(sample(&metrics, "leadex_storage_up "), 0.0);

    // A lead nobody bought cannot be answered without storage: 503, nothing internal shown.
    // (A sale goes to the spill file and is answered; tests/storage.rs.)
    let (status, body) = app.post_lead(&lead()).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["success"], false);
    assert_eq!(body["error"], "Internal error");
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// Graceful shutdown

#[actix_web::test]
async fn sigterm_lets_fifty_auctions_in_flight_finish_and_be_stored() {
    // Every auction takes about 2 s: a ping answered after 500 ms, a post after 1.5 s.
    let buyer = slow_sim(500, 1500);
    let data = data_dir();
    let text = config(&data, "", &slow_campaign_and_buyer(&buyer));
    let mut exchange = Exchange::start(&text, "text", "info").await;
    let client = http();

    let base = exchange.base.clone();
    let requests: Vec<_> = (0..50)
        .map(|_| {
            let (client, base) = (client.clone(), base.clone());
            actix_rt::spawn(async move { post_lead(&client, &base, &slow_lead()).await })
        })
        .collect();
    eventually("50 auctions in flight", Duration::from_secs(10), || {
        buyer.stats.pings() == 50
    })
    .await;
    assert_eq!(
        buyer.stats.accepted(),
        0,
        "no auction finished before the signal"
    );
    exchange.process.signal(libc::SIGTERM);

    // The listener closes at once, while the auctions still run.
    let closed_at = Instant::now() + Duration::from_millis(800);
    let mut refused = false;
    while Instant::now() < closed_at {
        if TcpStream::connect_timeout(&exchange.addr, Duration::from_millis(100)).is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "new connections are refused after SIGTERM");
    assert!(
        exchange.process.exited().is_none(),
        "still finishing the auctions"
    );

    let mut lead_ids = Vec::new();
    for request in requests {
        let (status, body) = request
            .await
            .unwrap()
            .expect("every request in flight gets its answer");
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("sold")),
            "{body}"
        );
        lead_ids.push(body["lead_id"].as_str().unwrap().to_owned());
    }
    let status = exchange
        .process
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("leadex exits after the auctions");
    let log = exchange.log_text();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("leadex stopped"), "{log}");
    assert_eq!(buyer.stats.posts(), 50);

    // Every answered lead is in the store after a restart.
    let restarted = Exchange::start(&text, "text", "info").await;
    assert_sold_to_slow_buyer(&client, &restarted, &lead_ids).await;
    drop(restarted);
}

#[actix_web::test]
async fn sigkill_loses_no_answered_lead_nor_its_idempotent_answer() {
    // Checkpoints far apart: every answered write is only in redb's non-durable commits and
    // the write-ahead log when the process is killed, so the restart must replay the log.
    let buyer = slow_sim(0, 0);
    let data = data_dir();
    let text = config(&data, "", &slow_campaign_and_buyer(&buyer)).replace(
        "backend = \"embedded\"",
        "backend = \"embedded\"\ncheckpoint_ms = 600000",
    );
    let mut exchange = Exchange::start(&text, "text", "info").await;
    let client = http();
    let base = exchange.base.clone();
    let requests: Vec<_> = (0..40)
        .map(|_| {
            let (client, base) = (client.clone(), base.clone());
            actix_rt::spawn(async move { post_lead(&client, &base, &slow_lead()).await })
        })
        .collect();
    let mut lead_ids = Vec::new();
    for request in requests {
        let (status, body) = request.await.unwrap().unwrap();
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("sold")),
            "{body}"
        );
        lead_ids.push(body["lead_id"].as_str().unwrap().to_owned());
    }
    let keyed = client
        .post(exchange.url("/api/leads"))
        .bearer_auth(KEY)
        .header("Idempotency-Key", "kill-me-once")
        .json(&slow_lead())
        .send()
        .await
        .unwrap();
    assert_eq!(keyed.status().as_u16(), 200);
    let keyed: Value = keyed.json().await.unwrap();

    exchange.process.signal(libc::SIGKILL);
    let status = exchange
        .process
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("killed");
    assert_eq!(status.code(), None, "ended by the signal, no clean stop");
    assert!(!exchange.log_text().contains("leadex stopped"));

    let restarted = Exchange::start(&text, "text", "info").await;
    let log = restarted.log_text();
    assert!(
        log.contains("applying writes from the write-ahead log writes=41"),
        "{log}"
    );
    assert_sold_to_slow_buyer(&client, &restarted, &lead_ids).await;
    // The repeat gets the first answer, with no second auction.
    let posts_before = buyer.stats.posts();
    let repeat = client
        .post(restarted.url("/api/leads"))
        .bearer_auth(KEY)
        .header("Idempotency-Key", "kill-me-once")
        .json(&slow_lead())
        .send()
        .await
        .unwrap();
    assert_eq!(repeat.status().as_u16(), 200);
    let repeat: Value = repeat.json().await.unwrap();
    assert_eq!(repeat, keyed);
    assert_eq!(buyer.stats.posts(), posts_before);
}

#[actix_web::test]
async fn sigkill_keeps_every_re_auction_of_a_pending_leads_log() {
    // Leads nobody bids on, auctioned again every second; checkpoints far apart, so each
    // re-auction's log events are only in the write-ahead log (and redb's non-durable commits)
    // when the process is killed.
    let buyer = sim("0", 0);
    let token = "sigkill-operator";
    let retrying = format!(
        r#"
[[campaigns]]
id = "acme-retry"
seller = "ACME1234"
category = "Home Warranty"
ping_timeout_ms = 200
pending_ttl_secs = 3600
retry_interval_secs = 1

[[buyers]]
id = "no-bidder"
campaigns = ["acme-retry"]
ping_url = "{}"
post_url = "{}"

[ops]
token_sha256 = ["{}"]
"#,
        buyer.url("/ping"),
        buyer.url("/post"),
        leadex::startup::hash_key(token)
    );
    let text = config(&data_dir(), "", &retrying).replace(
        "backend = \"embedded\"",
        "backend = \"embedded\"\ncheckpoint_ms = 600000",
    );
    let mut exchange = Exchange::start(&text, "text", "info").await;
    let client = http();
    let mut lead_ids = Vec::new();
    for _ in 0..5 {
        let (status, body) = post_lead(&client, &exchange.base, &slow_lead())
            .await
            .unwrap();
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("pending")),
            "{body}"
        );
        lead_ids.push(body["lead_id"].as_str().unwrap().to_owned());
    }
    let log_of = |exchange: &Exchange, lead_id: &str| {
        let request = client
            .get(exchange.url(&format!("/ops/leads/{lead_id}")))
            .bearer_auth(token);
        async move {
            let view: Value = request.send().await.unwrap().json().await.unwrap();
            assert_eq!(view["status"], "pending", "{view}");
            view["auction_log"].as_array().unwrap().clone()
        }
    };
    // Each lead auctioned at least three times (one ping each), within 20 s.
    let started = Instant::now();
    let mut before = Vec::new();
    while started.elapsed() < Duration::from_secs(20) {
        before.clear();
        for lead_id in &lead_ids {
            before.push(log_of(&exchange, lead_id).await);
        }
        if before.iter().all(|log| log.len() >= 3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(before.iter().all(|log| log.len() >= 3), "{before:?}");

    exchange.process.signal(libc::SIGKILL);
    exchange
        .process
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("killed");
    let restarted = Exchange::start(&text, "text", "info").await;
    assert!(
        restarted
            .log_text()
            .contains("applying writes from the write-ahead log"),
        "{}",
        restarted.log_text()
    );
    // Every event read before the kill is there after it, in order, re-auctions going on.
    for (lead_id, logged) in lead_ids.iter().zip(&before) {
        let after = log_of(&restarted, lead_id).await;
        assert!(after.len() >= logged.len(), "{lead_id}: {after:?}");
        assert_eq!(&after[..logged.len()], &logged[..], "{lead_id}");
    }
}

#[actix_web::test]
async fn sigterm_still_stores_the_auction_of_a_supplier_that_hung_up() {
    use std::io::Write;
    let buyer = slow_sim(300, 1200);
    let text = config(&data_dir(), "", &slow_campaign_and_buyer(&buyer));
    let mut exchange = Exchange::start(&text, "text", "info").await;

    // A supplier sends a lead and closes its socket before the answer.
    let body = slow_lead().to_string();
    let mut stream = TcpStream::connect(exchange.addr).unwrap();
    write!(
        stream,
        "POST /api/leads HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        exchange.addr,
        body.len()
    )
    .unwrap();
    stream.flush().unwrap();
    eventually("the auction started", Duration::from_secs(10), || {
        buyer.stats.pings() == 1
    })
    .await;
    drop(stream);
    exchange.process.signal(libc::SIGTERM);

    let status = exchange
        .process
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("leadex exits after the auction");
    let log = exchange.log_text();
    assert_eq!(status.code(), Some(0), "{log}");
    assert_eq!(buyer.stats.posts(), 1, "the auction went on to its post");
    let lead_id = buyer.stats.post_bodies()[0]["lead_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let restarted = Exchange::start(&text, "text", "info").await;
    let response = http()
        .get(restarted.url(&format!("/api/leads/{lead_id}")))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200, "{lead_id} stored");
    let stored: Value = response.json().await.unwrap();
    assert_eq!(stored["status"], "sold", "{stored}");
}

#[actix_web::test]
async fn a_second_signal_forces_the_exit() {
    // Auctions need over 5 s: only a forced stop ends them sooner.
    let buyer = slow_sim(300, 5000);
    let text = config(&data_dir(), "", &slow_campaign_and_buyer(&buyer));
    let mut exchange = Exchange::start(&text, "text", "info").await;
    let client = http();
    let requests: Vec<_> = (0..5)
        .map(|_| {
            let (client, base) = (client.clone(), exchange.base.clone());
            actix_rt::spawn(async move { post_lead(&client, &base, &slow_lead()).await })
        })
        .collect();
    eventually("auctions in flight", Duration::from_secs(10), || {
        buyer.stats.pings() == 5
    })
    .await;
    exchange.process.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        exchange.process.exited().is_none(),
        "the first signal waits"
    );
    let second = Instant::now();
    exchange.process.signal(libc::SIGTERM);
    let status = exchange
        .process
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("exits after the second signal");
    assert!(
        second.elapsed() < Duration::from_secs(3),
        "exited {:?} after the second signal, before the auctions could end",
        second.elapsed()
    );
    let log = exchange.log_text();
    assert_ne!(
        status.code(),
        Some(0),
        "a forced stop is not a clean exit:\n{log}"
    );
    assert!(log.contains("second signal"), "{log}");
    // A cut-short request loses its connection or, if its auction ended as the store and
    // the actors stopped, gets a 5xx; never a 200 for a lead that was not stored.
    for request in requests {
        match request.await.unwrap() {
            Err(_) => {}
            Ok((status, body)) => assert!(status >= 500, "{status} {body}\n{log}"),
        }
    }
}

#[actix_web::test]
async fn the_grace_period_forces_the_exit() {
    // Auctions need over 5 s: only a forced stop ends them sooner.
    let buyer = slow_sim(300, 5000);
    let text = config(&data_dir(), "", &slow_campaign_and_buyer(&buyer))
        .replace("shutdown_grace_secs = 10", "shutdown_grace_secs = 1");
    let mut exchange = Exchange::start(&text, "text", "info").await;
    let client = http();
    let requests: Vec<_> = (0..5)
        .map(|_| {
            let (client, base) = (client.clone(), exchange.base.clone());
            actix_rt::spawn(async move { post_lead(&client, &base, &slow_lead()).await })
        })
        .collect();
    eventually("auctions in flight", Duration::from_secs(10), || {
        buyer.stats.pings() == 5
    })
    .await;
    let signalled = Instant::now();
    exchange.process.signal(libc::SIGTERM);
    let status = exchange
        .process
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits when the grace period ends");
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "exited {took:?} after SIGTERM with a 1 s grace period"
    );
    let log = exchange.log_text();
    assert_ne!(status.code(), Some(0), "{log}");
    assert!(log.contains("grace period over"), "{log}");
    // A cut-short request loses its connection or, if its auction ended as the store and
    // the actors stopped, gets a 5xx; never a 200 for a lead that was not stored.
    for request in requests {
        match request.await.unwrap() {
            Err(_) => {}
            Ok((status, body)) => assert!(status >= 500, "{status} {body}\n{log}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Logs

/// Personal values sent in the leads below, as sent and as normalised.
const PERSONAL: [&str; 9] = [
    "Zebulon",
    "Quackenbush",
    "zeb.quack@example.org",
    "ZEB.QUACK",
    "867-5309",
    "8675309",
    "742 Evergreen",
    "Evergreen Terrace",
    "zeb.quack@@broken",
];

fn personal_lead() -> Value {
    json!({
        "seller": "ACME1234",
        "category": "Auto Insurance",
        "firstName": "Zebulon",
        "lastName": "Quackenbush",
        "email": " ZEB.QUACK@example.org ",
        "phone": "(555) 867-5309",
        "address": "742 Evergreen Terrace",
        "state": "tx",
        "zip": "75001"
    })
}

/// Sends sold, pending, invalid, form and query-string leads carrying personal values.
async fn send_personal_traffic(exchange: &Exchange) -> Vec<String> {
    let client = http();
    let mut lead_ids = Vec::new();
    for _ in 0..3 {
        let (status, body) = post_lead(&client, &exchange.base, &personal_lead())
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        lead_ids.push(body["lead_id"].as_str().unwrap().to_owned());
    }
    let mut solar = personal_lead();
    solar["category"] = json!("Solar");
    let (status, _) = post_lead(&client, &exchange.base, &solar).await.unwrap();
    assert_eq!(status, 200);
    let mut invalid = personal_lead();
    invalid["email"] = json!("zeb.quack@@broken");
    invalid["phone"] = json!("555-867-5309x");
    let (status, body) = post_lead(&client, &exchange.base, &invalid).await.unwrap();
    assert_eq!(status, 400, "{body}");
    let form = client
        .post(exchange.url("/api/leads?firstName=Zebulon&lastName=Quackenbush"))
        .bearer_auth(KEY)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("seller=ACME1234&category=Auto+Insurance&phone=555-867-5309&state=TX&email=zeb.quack%40example.org&address=742+Evergreen+Terrace")
        .send()
        .await
        .unwrap();
    assert_eq!(form.status().as_u16(), 200);
    let bad_json = client
        .post(exchange.url("/api/leads"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(r#"{"firstName": "Zebulon", "phone": "555-867-5309", "#)
        .send()
        .await
        .unwrap();
    assert_eq!(bad_json.status().as_u16(), 400);
    lead_ids
}

/// Case-insensitive: a normalised (lower-cased) email counts too.
fn assert_no_personal_value(log: &str) {
    for value in PERSONAL {
        if let Some(line) = log
            .lines()
            .find(|l| l.to_lowercase().contains(&value.to_lowercase()))
        {
            panic!("a log line carries the personal value {value:?}:\n{line}");
        }
    }
}

#[actix_web::test]
async fn debug_text_logs_carry_no_personal_field() {
    let buyer = sim("12", 1);
    let text = config(&data_dir(), "", &ping_buyer("buyer-a", &buyer, ""));
    let exchange = Exchange::start(&text, "text", "debug").await;
    send_personal_traffic(&exchange).await;
    let log = exchange.log_text();
    assert!(log.lines().count() > 20, "debug logging is on:\n{log}");
    assert!(log.contains("DEBUG"), "debug lines are written:\n{log}");
    assert!(log.contains("auction done"), "{log}");
    assert_no_personal_value(&log);
    // The buyers did receive the personal fields: the check above is not vacuous.
    let post = &buyer.stats.post_bodies()[0];
    assert_eq!(post["lead"]["firstName"], "Zebulon");
}

#[actix_web::test]
async fn debug_json_logs_carry_request_and_lead_ids_and_no_personal_field() {
    let buyer = sim("12", 1);
    let text = config(&data_dir(), "", &ping_buyer("buyer-a", &buyer, ""));
    let exchange = Exchange::start(&text, "json", "debug").await;
    let lead_ids = send_personal_traffic(&exchange).await;
    let log = exchange.log_text();
    assert_no_personal_value(&log);

    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let spans =
        |line: &Value| -> Vec<Value> { line["spans"].as_array().cloned().unwrap_or_default() };
    let span_field = |line: &Value, span: &str, field: &str| -> Option<String> {
        spans(line)
            .iter()
            .find(|s| s["name"] == span)
            .and_then(|s| s[field].as_str().map(str::to_owned))
    };
    // Every line of our own code written while a request is handled names the request.
    let in_requests: Vec<&Value> = lines
        .iter()
        .filter(|l| {
            l["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("leadex"))
        })
        .filter(|l| spans(l).iter().any(|s| s["name"] == "request"))
        .collect();
    assert!(in_requests.len() >= 8, "{log}");
    for line in &in_requests {
        let request_id = span_field(line, "request", "request_id");
        assert!(request_id.is_some_and(|id| id.len() == 26), "{line}");
    }
    // Every line of an auction names its lead and campaign in the request's span (recorded
    // when the auction starts), beside the same request id as the request's "lead accepted"
    // line.
    for lead_id in &lead_ids {
        let auction: Vec<&Value> = lines
            .iter()
            .filter(|l| span_field(l, "request", "lead_id").as_deref() == Some(lead_id.as_str()))
            .collect();
        assert!(
            auction.iter().any(|l| l["message"] == "auction done"),
            "no 'auction done' line for {lead_id}:\n{log}"
        );
        assert!(
            auction
                .iter()
                .any(|l| l["message"] == "post answered" && l["level"] == "DEBUG"),
            "no debug 'post answered' line for {lead_id}"
        );
        let accepted = lines
            .iter()
            .find(|l| l["message"] == "lead accepted" && l["lead_id"] == lead_id.as_str())
            .unwrap_or_else(|| panic!("no 'lead accepted' line for {lead_id}"));
        let request_id = span_field(accepted, "request", "request_id").expect("request id");
        for line in &auction {
            assert_eq!(
                span_field(line, "request", "request_id").as_deref(),
                Some(request_id.as_str()),
                "{line}"
            );
        }
    }
    for line in lines.iter().filter(|l| l["message"] == "auction done") {
        assert!(span_field(line, "request", "lead_id").is_some(), "{line}");
        assert!(span_field(line, "request", "campaign").is_some(), "{line}");
        assert!(
            span_field(line, "request", "request_id").is_some(),
            "{line}"
        );
    }
}

/// The load runs' durable baseline (`fanout-baseline --sync-dir`) answers a lead only once its
/// outcome is in the log file: after three sales the file holds three records, each the lead
/// and the answer the driver got.
#[actix_web::test]
async fn the_durable_baseline_answers_what_its_log_holds() {
    let buyer = sim_with(Behaviour::default());
    let dir = tempfile::tempdir().unwrap();
    let stdout = dir.path().join("stdout.log");
    let child = Command::new(env!("CARGO_BIN_EXE_fanout-baseline"))
        .args(["--listen", "127.0.0.1:0", "--buyers"])
        .arg(buyer.url(""))
        .arg("--sync-dir")
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(File::create(&stdout).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("fanout-baseline starts");
    let mut process = Guard(Some(child));
    let addr = process
        .listening(&stdout, "fanout-baseline listening")
        .await;
    let client = http();
    let mut answers = Vec::new();
    for i in 0..3 {
        let mut body = lead();
        body["email"] = json!(format!("lead{i}@email.com"));
        let (status, answer) = post_lead(&client, &format!("http://{addr}"), &body)
            .await
            .unwrap();
        assert_eq!((status, answer["status"].as_str()), (200, Some("sold")));
        answers.push((body, answer));
    }
    let log = std::fs::read(dir.path().join("outcomes.log")).unwrap();
    let mut records = Vec::new();
    let mut at = 0;
    loop {
        let len = u32::from_le_bytes(log[at..at + 4].try_into().unwrap()) as usize;
        if len == 0 {
            // Zeros to the end of a group's last block; the next group starts a block.
            if at % BLOCK == 0 {
                break;
            }
            at = at.next_multiple_of(BLOCK);
            continue;
        }
        records.push(serde_json::from_slice::<Value>(&log[at + 4..at + 4 + len]).unwrap());
        at += 4 + len;
    }
    let expected: Vec<Value> = answers
        .into_iter()
        .map(|(lead, outcome)| json!({ "lead": lead, "outcome": outcome }))
        .collect();
    assert_eq!(records, expected);
}
