//! Extra cost of a persisted run over a disposable one, for a 1 KiB change, on the small base
//! image and on a ≥ 500 MiB image, measured in one run. Two measures:
//! - the persist phase inside the operation: event time of `shutdown` minus `exit` (the
//!   export of the diff, unpacking, erofs build, publishing and the image row), which is
//!   all a disposable run skips, with little noise;
//! - client-side spawn → completion medians, which include boot jitter.
//!
//! Run with `bench/persist.sh [N]`.

use std::collections::BTreeMap;
use std::time::Instant;

use boxwood::app::App;
use boxwood::config::Config;
use boxwood_core::Service;
use boxwood_image::{FsLayerStore, LayerStore, build_busybox_tree};
use boxwood_vm::Accel;
use serde_json::{Value, json};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Client {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl Client {
    /// Runs to completion; returns client-side ms and the persist phase (shutdown − exit) in ms.
    async fn run(&self, image: &str, disposable: bool) -> anyhow::Result<(f64, f64)> {
        let t0 = Instant::now();
        let body = json!({"command": "head -c 1024 /dev/urandom > /change.bin", "shell": true, "image": image,
                          "disposable": disposable});
        let resp: Value = self
            .http
            .post(format!("{}/v1/instances", self.url))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await?
            .json()
            .await?;
        let op = resp["uuid"].as_str().unwrap_or_default().to_owned();
        let sse = self
            .http
            .get(format!("{}/v1/operations/{op}/events?follow=1", self.url))
            .bearer_auth(&self.token)
            .send()
            .await?
            .text()
            .await?;
        let client_ms = t0.elapsed().as_secs_f64() * 1e3;
        let mut ts = BTreeMap::new();
        for line in sse.lines().filter_map(|l| l.strip_prefix("data: ")) {
            let ev: Value = serde_json::from_str(line)?;
            ts.insert(
                ev["type"].as_str().unwrap_or_default().to_owned(),
                ev["ts"].as_str().unwrap_or_default().to_owned(),
            );
            if ev["type"] == "completion" {
                anyhow::ensure!(ev["data"]["status"] == "SUCCESS", "run failed: {ev}");
            }
        }
        let parse = |k: &str| {
            time::OffsetDateTime::parse(&ts[k], &time::format_description::well_known::Rfc3339)
                .map(|t| t.unix_timestamp_nanos() as f64 / 1e6)
        };
        Ok((client_ms, parse("shutdown")? - parse("exit")?))
    }
}

/// Makes a busybox image with `mib` MiB of incompressible data in it, directly in the layer
/// store (a guest could not write that much into its RAM-backed writable layer).
async fn big_image(state: &std::path::Path, mib: usize) -> anyhow::Result<String> {
    let layers = FsLayerStore::open(&state.join("images"))?;
    let tree = layers.staging_dir()?;
    build_busybox_tree(std::path::Path::new("/bin/busybox"), &tree)?;
    std::fs::create_dir_all(tree.join("data"))?;
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    for i in 0..mib / 10 {
        let mut f = Vec::with_capacity(10 << 20);
        for j in 0..10 {
            f.extend(chunk.iter().map(|b| b ^ (i * 10 + j) as u8));
        }
        std::fs::write(tree.join("data").join(format!("blob{i}")), f)?;
    }
    let layer = layers.commit_tree(tree).await?;
    Ok(layer.digest)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(8).max(2);
    let state = tempfile::tempdir()?;
    let t0 = Instant::now();
    let digest = big_image(state.path(), 520).await?;
    eprintln!("built a 520 MiB image layer in {:.1}s", t0.elapsed().as_secs_f64());
    let mut cfg = Config { state_dir: state.path().to_owned(), listen: "127.0.0.1:0".parse()?, ..Config::default() };
    cfg.vm.accel = Accel::Tcg;
    let app = App::start(cfg).await?;
    let big = register(app.service(), &digest).await?;
    let client = Client {
        http: reqwest::Client::new(),
        url: format!("http://{}", app.local_addr()?),
        token: app.bootstrap_token.clone().unwrap_or_default(),
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.serve(async move {
        let _ = stop_rx.await;
    }));
    println!("persisted vs disposable run, 1 KiB change, n={n} each (interleaved):");
    for (name, image) in [("busybox (~2 MiB)", "tag:busybox:latest".to_owned()), ("big (520 MiB)", big)] {
        let (mut dc, mut dp, mut pc, mut pp) = (vec![], vec![], vec![], vec![]);
        for _ in 0..n {
            let (c, p) = client.run(&image, true).await?;
            dc.push(c);
            dp.push(p);
            let (c, p) = client.run(&image, false).await?;
            pc.push(c);
            pp.push(p);
        }
        let (mdp, mpp) = (median(&mut dp), median(&mut pp));
        let (mdc, mpc) = (median(&mut dc), median(&mut pc));
        println!(
            "  {name:18} persist phase: disposable {mdp:6.1} ms, persisted {mpp:6.1} ms, extra {:6.1} ms | client median: {mdc:6.0} vs {mpc:6.0} ms (extra {:5.0} ms)",
            mpp - mdp,
            mpc - mdc
        );
    }
    let _ = stop_tx.send(());
    server.await??;
    Ok(())
}

async fn register(service: &Service, digest: &str) -> anyhow::Result<String> {
    let image = boxwood_store::ImageRecord {
        uuid: uuid::Uuid::new_v4(),
        namespace: "default".into(),
        parent_uuid: None,
        operation_uuid: None,
        layers: vec![digest.to_owned()],
        env: BTreeMap::from([("PATH".to_owned(), boxwood_core::spec::DEFAULT_PATH.to_owned())]),
        workdir: None,
        size_bytes: 520 << 20,
        created_at_us: boxwood_core::clock::now_us(),
    };
    Ok(service.ensure_tagged_image("default", "bench-big:1", image).await?.to_string())
}
