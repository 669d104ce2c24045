//! The `boxwood` client commands end to end against a real server: `run` streams and exits
//! with the command's code (124 at a timeout), `--save` makes an image that `images --tree`
//! draws under its parent, `-o json` listings parse, `login` saves a 0600 file the other
//! commands use, and a wrong token is one clear line and a failure exit.

use std::os::unix::fs::PermissionsExt as _;
use std::process::Output;

use serde_json::Value;

use crate::harness::TestServer;

async fn boxwood(args: &[&str], config_dir: &std::path::Path) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_boxwood"))
        .args(args)
        .env("BOXWOOD_CONFIG_DIR", config_dir)
        .env_remove("BOXWOOD_URL")
        .env_remove("BOXWOOD_TOKEN")
        .env_remove("CONTREE_URL")
        .env_remove("CONTREE_TOKEN")
        .output()
        .await
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn the_cli_runs_streams_saves_lists_and_logs_in() {
    let s = TestServer::start().await;
    let home = tempfile::tempdir().unwrap();
    let cfg = home.path();
    let remote = ["--url", s.url.as_str(), "--token", s.token.as_str()];
    let with = |cmd: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        let at = v.iter().position(|a| a == "--").unwrap_or(v.len());
        for (i, r) in remote.iter().enumerate() {
            v.insert(at + i, r.to_string());
        }
        v
    };
    let run = |cmd: &[&str]| {
        let args = with(cmd);
        async move { boxwood(&args.iter().map(String::as_str).collect::<Vec<_>>(), cfg).await }
    };

    let out = run(&["run", "--", "echo hi; echo err >&2; exit 3"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hi\n");
    assert!(text(&out.stderr).contains("err"), "{}", text(&out.stderr));
    let out = run(&["run", "-e", "A=b c", "-w", "/tmp", "--", "sh", "-c", "echo \"$A\" $(pwd)"]).await;
    assert_eq!((out.status.code(), text(&out.stdout)), (Some(0), "b c /tmp\n".into()), "{}", text(&out.stderr));
    let out = run(&["run", "--timeout", "1", "--", "sleep 30"]).await;
    assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));

    let out = run(&["run", "--save", "--", "echo saved > /f"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    let saved = err.split("saved image ").nth(1).map(|r| r.trim().to_owned()).expect("the new image is named");
    let out = run(&["images", "--tree"]).await;
    let tree = text(&out.stdout);
    assert!(out.status.success() && tree.contains(&format!("└── {saved}")), "{tree}");
    assert!(tree.lines().any(|l| l.contains("(busybox:latest)") && !l.starts_with(' ')), "the base is a root: {tree}");
    let out = run(&["images", "-o", "json"]).await;
    let images: Value = serde_json::from_slice(&out.stdout).expect("images -o json is JSON");
    assert!(images.as_array().unwrap().iter().any(|i| i["uuid"] == saved.as_str()), "{images}");
    let out = run(&["ps", "-o", "json"]).await;
    let ops: Value = serde_json::from_slice(&out.stdout).expect("ps -o json is JSON");
    assert!(ops.as_array().unwrap().len() >= 4, "{ops}");
    let out = run(&["tag", &saved, "cli:1"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(&["run", "-i", "cli:1", "--", "cat /f"]).await;
    assert_eq!(text(&out.stdout), "saved\n", "{}", text(&out.stderr));

    // An image's files without a VM, an upload, a run's log, a command in a live run.
    let out = run(&["cat", "cli:1", "/f"]).await;
    assert_eq!(text(&out.stdout), "saved\n", "{}", text(&out.stderr));
    let out = run(&["ls", "busybox:latest", "/bin"]).await;
    assert!(text(&out.stdout).contains("busybox"), "{}", text(&out.stdout));
    let file = home.path().join("up.txt");
    std::fs::write(&file, "uploaded\n").unwrap();
    let out = run(&["upload", file.to_str().unwrap()]).await;
    let line = text(&out.stdout);
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert!(fields.len() == 2 && fields[1].len() == 64, "uuid and sha256: {line}");
    let (_, upload) = s.get_json(&format!("/files/{}", fields[1])).await;
    assert_eq!(upload["uuid"], fields[0], "{upload}");
    // Newest first: the oldest run is the first one, which printed "hi".
    let first =
        ops.as_array().unwrap().iter().rev().find(|o| o["kind"] == "instance").unwrap()["uuid"].as_str().unwrap();
    let out = run(&["logs", first]).await;
    assert_eq!(text(&out.stdout), "hi\n", "{}", text(&out.stderr));
    let live =
        s.start_run(serde_json::json!({"command": "sleep 30", "shell": true, "image": "tag:busybox:latest"})).await;
    s.wait_status(&live, "EXECUTING", std::time::Duration::from_secs(120)).await;
    let out = run(&["exec", &live, "--", "echo inside; exit 4"]).await;
    assert_eq!((out.status.code(), text(&out.stdout)), (Some(4), "inside\n".into()), "{}", text(&out.stderr));
    let out = run(&["cancel", &live]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));

    // A wrong token: one line saying so, and a failure exit.
    let out = boxwood(&["ps", "--url", &s.url, "--token", "wrong"], cfg).await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("401") || err.to_lowercase().contains("token"), "{err}");

    // login saves the server and token privately; later commands need no flags.
    let out = boxwood(&["login", &s.url, "--token", &s.token], cfg).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let saved_file = cfg.join("login.toml");
    assert_eq!(std::fs::metadata(&saved_file).unwrap().permissions().mode() & 0o777, 0o600);
    let out = boxwood(&["run", "--", "echo logged"], cfg).await;
    assert_eq!(text(&out.stdout), "logged\n", "{}", text(&out.stderr));
    let out = boxwood(&["login", &s.url, "--token", "wrong"], cfg).await;
    assert!(!out.status.success(), "a token the server refuses is not saved");
    assert!(std::fs::read_to_string(&saved_file).unwrap().contains(&s.token));
}
