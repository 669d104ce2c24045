//! Metrics as an operator sees them: a real Prometheus (Debian's `prometheus`) scrapes
//! `/metrics` with a token; the series are there, and the run series move when runs happen.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::TestServer;

struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Prometheus {
    fn scraping(s: &TestServer) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let target = s.url.trim_start_matches("http://");
        let config = format!(
            "global: {{ scrape_interval: 1s, scrape_timeout: 1s }}\n\
             scrape_configs:\n  - job_name: boxwood\n    authorization: {{ credentials: \"{}\" }}\n    \
             static_configs: [{{ targets: [\"{target}\"] }}]\n",
            s.token
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian package `prometheus`, installed by scripts/install-deps.sh)");
        Self { child, url: format!("http://127.0.0.1:{port}"), _dir: dir }
    }

    /// The instant vector of `query` (empty until Prometheus is up and has scraped).
    async fn query(&self, query: &str) -> Vec<Value> {
        let encoded: String = query
            .bytes()
            .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
            .collect();
        let Ok(r) = reqwest::get(format!("{}/api/v1/query?query={encoded}", self.url)).await else {
            return Vec::new();
        };
        let body: Value = r.json().await.unwrap_or(Value::Null);
        body["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The one value of `query`, 0 when it has no series.
    async fn value(&self, query: &str) -> f64 {
        self.query(query).await.first().and_then(|v| v["value"][1].as_str()?.parse().ok()).unwrap_or(0.0)
    }

    async fn until(&self, what: &str, mut ok: impl AsyncFnMut(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(90);
        while !ok(self).await {
            assert!(Instant::now() < deadline, "Prometheus never saw {what}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_series_and_they_move_with_runs() {
    let s = TestServer::start().await;
    // Scraping needs a token: without one, 401 in the envelope.
    let r = reqwest::get(format!("{}/metrics", s.url)).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    let prom = Prometheus::scraping(&s);
    prom.until("the target up", async |p| p.value(r#"up{job="boxwood"}"#).await == 1.0).await;
    let names: HashSet<String> = prom
        .query(r#"count by (__name__) ({__name__=~"boxwood_.+"})"#)
        .await
        .iter()
        .filter_map(|v| v["metric"]["__name__"].as_str().map(str::to_owned))
        .collect();
    for want in [
        "boxwood_vm_starts_total",
        "boxwood_pool_idle_vms",
        "boxwood_pool_target_vms",
        "boxwood_live_vms",
        "boxwood_qemu_cpu_seconds",
        "boxwood_qemu_pss_bytes",
        "boxwood_store_errors_total",
        "boxwood_disk_free_bytes",
        "boxwood_disk_total_bytes",
        "boxwood_stored_bytes",
        "boxwood_gc_reclaimed_bytes_total",
    ] {
        assert!(names.contains(want), "{want} is scraped: {names:?}");
    }
    assert!(prom.value(r#"boxwood_stored_bytes{kind="layers"}"#).await > 0.0, "the base layer is counted");

    // Runs move the run series.
    let before = prom.value(r#"sum(boxwood_operations_total{kind="instance",status="SUCCESS"})"#).await;
    let starts = prom.value("sum(boxwood_vm_starts_total)").await;
    for cmd in ["echo one", "echo two > /kept"] {
        let (op, _) = s.run(json!({"command": cmd, "shell": true, "disposable": cmd == "echo one"})).await;
        assert_eq!(op["status"], "SUCCESS", "{op}");
    }
    prom.until("two more successful runs", async |p| {
        p.value(r#"sum(boxwood_operations_total{kind="instance",status="SUCCESS"})"#).await >= before + 2.0
    })
    .await;
    prom.until("their VM starts", async |p| p.value("sum(boxwood_vm_starts_total)").await >= starts + 2.0).await;
    prom.until("their durations", async |p| {
        p.value(r#"sum(boxwood_run_duration_seconds_count{kind="instance"})"#).await >= 2.0
            && p.value(r#"sum(boxwood_run_queue_wait_seconds_bucket{kind="instance",le="+Inf"})"#).await >= 2.0
    })
    .await;
    prom.until("the pool's QEMUs' memory", async |p| {
        p.value("boxwood_pool_idle_vms").await > 0.0 && p.value("boxwood_qemu_pss_bytes").await > 0.0
    })
    .await;

    // The exposition passes Prometheus's own linter.
    let r = reqwest::Client::new().get(format!("{}/metrics", s.url)).bearer_auth(&s.token).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "text/plain; version=0.0.4; charset=utf-8");
    let text = r.text().await.unwrap();
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut lint.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = lint.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    s.stop().await;
}
