//! Cold-run latency: client-side spawn → `completion` of `true` on busybox through the HTTP
//! API, next to the raw boot time (QEMU spawn → agent ready) of the same microVM, both
//! measured in this run on this machine. Run with `bench/cold_run.sh [N]`.

use std::time::{Duration, Instant};

use boxwood::app::App;
use boxwood::config::Config;
use boxwood_protocol::RootfsSpec;
use boxwood_vm::{Accel, QemuRuntime, VmRuntime, VmSpec, prepare_guest_assets};
use serde_json::{Value, json};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn p95(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * 0.95).ceil() as usize).saturating_sub(1).min(v.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(10).max(1);
    let accel = match std::env::var("BOXWOOD_ACCEL").as_deref() {
        Ok("kvm") => Accel::Kvm,
        Ok("auto") => Accel::Auto,
        _ => Accel::Tcg,
    };
    let state = tempfile::tempdir()?;
    let mut cfg = Config { state_dir: state.path().to_owned(), listen: "127.0.0.1:0".parse()?, ..Config::default() };
    cfg.vm.accel = accel;

    // Raw boot: the runtime alone, no API, no image, no command.
    let assets = prepare_guest_assets(&cfg.agent_path()?, &state.path().join("raw-guest"), None)?;
    let runtime = QemuRuntime::new(cfg.vm.clone(), assets, state.path().join("raw-run")).await?;
    let mut boots = Vec::new();
    let mut boot_walls = Vec::new();
    for i in 0..n {
        let spec = VmSpec {
            name: format!("raw{i}"),
            disks: vec![],
            rootfs: RootfsSpec { lower_serials: vec![], upper_size_bytes: 64 << 20, upper_disk: None },
            hostname: "bench".into(),
            memory_mib: None,
            vcpus: None,
            network: false,
            upper_on_disk: true,
        };
        let t0 = Instant::now();
        let vm = runtime.start(spec).await?;
        boot_walls.push(t0.elapsed().as_secs_f64() * 1e3);
        boots.push(vm.boot_duration().as_secs_f64() * 1e3);
        vm.shutdown().await?;
    }

    let app = App::start(cfg).await?;
    let url = format!("http://{}", app.local_addr()?);
    let token = app.bootstrap_token.clone().unwrap_or_default();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.serve(async move {
        let _ = stop_rx.await;
    }));
    let client = reqwest::Client::new();
    let mut runs = Vec::new();
    for _ in 0..n {
        let t0 = Instant::now();
        let resp: Value = client
            .post(format!("{url}/v1/instances"))
            .bearer_auth(&token)
            .json(&json!({"command": "true", "image": "tag:busybox:latest", "disposable": true}))
            .send()
            .await?
            .json()
            .await?;
        let op = resp["uuid"].as_str().unwrap_or_default().to_owned();
        let body = client
            .get(format!("{url}/v1/operations/{op}/events?follow=1"))
            .bearer_auth(&token)
            .timeout(Duration::from_secs(300))
            .send()
            .await?
            .text()
            .await?;
        runs.push(t0.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(body.contains("\"status\":\"SUCCESS\""), "run failed: {body}");
    }
    let _ = stop_tx.send(());
    server.await??;

    let (rm, bm, bw) = (median(&mut runs), median(&mut boots), median(&mut boot_walls));
    println!(
        "cold run (spawn -> completion of `true`, client side), n={n}: median {rm:.0} ms, p95 {:.0} ms",
        p95(&mut runs)
    );
    println!("raw microVM boot (QEMU spawn -> agent ready), n={n}:      median {bm:.0} ms (start() wall {bw:.0} ms)");
    println!("ratio cold run / raw boot: {:.2}x  (overhead {:.0} ms)", rm / bm, rm - bm);
    Ok(())
}
