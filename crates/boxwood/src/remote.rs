//! The client commands of `boxwood` (`run`, `exec`, `logs`, `images`, `ls`, `cat`, `upload`,
//! `ps`, `cancel`, `tag`, `login`): each parses its flags, makes the typed client's calls and
//! prints; the server decides the rest.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;

use anyhow::Context as _;
use boxwood_client::types::{EventKind, ExecRequest, ImageView, OperationResponse, SpawnRequest, StreamRepr};
use boxwood_client::{Client, EventsOptions, ImageQuery, OperationQuery};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};

/// Where a client command finds the server: flags, then `BOXWOOD_URL`/`BOXWOOD_TOKEN` (or
/// `CONTREE_URL`/`CONTREE_TOKEN`), then what `boxwood login` saved.
#[derive(clap::Args, Clone, Default)]
pub struct Remote {
    /// The server (default: BOXWOOD_URL, else CONTREE_URL, else `boxwood login`'s, else
    /// http://127.0.0.1:8080).
    #[arg(long)]
    pub url: Option<String>,
    /// The API token (default: BOXWOOD_TOKEN, else CONTREE_TOKEN, else `boxwood login`'s).
    #[arg(long)]
    pub token: Option<String>,
}

/// What `boxwood login` keeps (0600).
#[derive(Serialize, Deserialize)]
struct Saved {
    url: String,
    token: String,
}

/// `$BOXWOOD_CONFIG_DIR/login.toml`, else `$XDG_CONFIG_HOME/boxwood/…`, else `~/.config/boxwood/…`.
fn login_file() -> Option<PathBuf> {
    let dir = std::env::var_os("BOXWOOD_CONFIG_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CONFIG_HOME").map(|d| PathBuf::from(d).join("boxwood")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/boxwood")))?;
    Some(dir.join("login.toml"))
}

fn from_env(names: [&str; 2]) -> Option<String> {
    names.iter().find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
}

impl Remote {
    pub fn client(&self) -> anyhow::Result<Client> {
        let saved: Option<Saved> =
            login_file().and_then(|p| std::fs::read_to_string(p).ok()).and_then(|t| toml::from_str(&t).ok());
        let url = self
            .url
            .clone()
            .or_else(|| from_env(["BOXWOOD_URL", "CONTREE_URL"]))
            .or_else(|| saved.as_ref().map(|s| s.url.clone()))
            .unwrap_or_else(|| "http://127.0.0.1:8080".into());
        let token = self
            .token
            .clone()
            .or_else(|| from_env(["BOXWOOD_TOKEN", "CONTREE_TOKEN"]))
            .or_else(|| saved.map(|s| s.token))
            .context("no token: pass --token, set BOXWOOD_TOKEN, or run `boxwood login URL --token T`")?;
        Ok(Client::new(&url, &token)?)
    }
}

/// `boxwood login URL --token T`: checks the token with the server, then saves both.
pub async fn login(url: &str, token: &str) -> anyhow::Result<PathBuf> {
    let me = Client::new(url, token)?.whoami().await?;
    let path = login_file().context("no HOME: set BOXWOOD_CONFIG_DIR")?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let text = toml::to_string(&Saved { url: url.to_owned(), token: token.to_owned() })?;
    let tmp = path.with_extension("tmp");
    // A leftover would keep its own mode when opened: start from none.
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("write {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    std::fs::rename(&tmp, &path)?;
    eprintln!("logged in to {url} with token {}", me.token_uuid);
    Ok(path)
}

/// `boxwood run`'s flags.
#[derive(clap::Args)]
pub struct RunArgs {
    /// The image: a UUID or `tag:NAME` (a bare NAME is taken as a tag).
    #[arg(short, long, default_value = "tag:busybox:latest")]
    pub image: String,
    /// Keep the run's changes as a new image (printed on stderr).
    #[arg(long)]
    pub save: bool,
    /// KEY=VALUE in the environment (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory (created if missing; default: the image's, else /).
    #[arg(short = 'w', long)]
    pub cwd: Option<String>,
    /// Seconds before the command is killed.
    #[arg(long)]
    pub timeout: Option<i64>,
    /// No network in the VM.
    #[arg(long)]
    pub no_network: bool,
    /// The command: one argument runs in `sh -c`, several run as they are.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

fn image_ref(image: &str) -> String {
    let uuid_like = image.len() == 36 && image.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    if uuid_like || image.starts_with("tag:") { image.to_owned() } else { format!("tag:{image}") }
}

/// A command line as the API takes it: one argument runs in `sh -c`, several as argv.
fn command_parts(command: &[String]) -> anyhow::Result<(String, Option<Vec<String>>, bool)> {
    Ok(match command {
        [one] => (one.clone(), None, true),
        [first, rest @ ..] => (first.clone(), Some(rest.to_vec()), false),
        [] => anyhow::bail!("no command: give it after `--`"),
    })
}

/// The status to exit with for a process's exit code: the code, 128 if it was signalled
/// (the API's -1), 125 if it never got one.
fn exit_status(code: Option<i64>) -> i32 {
    match code {
        Some(code) if (0..=255).contains(&code) => code as i32,
        Some(_) => 128,
        None => 125,
    }
}

/// The spawn request of `boxwood run`.
pub fn spawn_request(a: &RunArgs) -> anyhow::Result<SpawnRequest> {
    let mut env = BTreeMap::new();
    for kv in &a.env {
        let (k, v) = kv.split_once('=').with_context(|| format!("-e {kv:?}: write KEY=VALUE"))?;
        env.insert(k.to_owned(), Some(v.to_owned()));
    }
    let (command, args, shell) = command_parts(&a.command)?;
    Ok(SpawnRequest {
        image: image_ref(&a.image),
        process: ExecRequest {
            command,
            args,
            shell: Some(shell),
            env: (!env.is_empty()).then_some(env),
            cwd: a.cwd.clone(),
            ..Default::default()
        },
        timeout: a.timeout,
        disposable: Some(!a.save),
        networking: Some(boxwood_client::types::Networking { enabled: Some(!a.no_network) }),
        ..Default::default()
    })
}

/// The exit code of a finished run (`-1` if signalled), if it got one.
fn exit_code(op: &OperationResponse) -> Option<i64> {
    op.metadata.pointer("/result/state/exit_code").and_then(serde_json::Value::as_i64)
}

/// `boxwood run`: streams the command's stdout and stderr as they come and returns the exit
/// code to leave with (the command's; 124 at its timeout; 130 after Ctrl-C, which cancels it;
/// 125 when the run failed before the command ended).
pub async fn run(client: &Client, a: &RunArgs) -> anyhow::Result<i32> {
    let spawned = client.spawn(&spawn_request(a)?).await?;
    let id = spawned.uuid;
    let events = client.events(&id, EventsOptions { follow: true, ..Default::default() });
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {
            client.cancel(&id).await?;
            eprintln!("cancelled {id}");
            return Ok(130);
        }
        done = print_streams(events, None) => { done?; }
    }
    let op = client.operation(&id, false).await?;
    let timed_out = op.metadata.pointer("/result/state/timed_out").and_then(serde_json::Value::as_bool) == Some(true);
    if a.save
        && let Some(image) = op.result.as_ref().and_then(|r| r.image.clone())
    {
        eprintln!("saved image {image}");
    }
    let code = exit_code(&op);
    if timed_out {
        eprintln!("the command was killed at its timeout (--timeout to give it longer)");
        return Ok(124);
    }
    if code.is_none() {
        eprintln!("{id}: {}", op.summary.error.as_deref().unwrap_or("the run ended without an exit code"));
    }
    Ok(exit_status(code))
}

/// Writes the stdout and stderr events of `events` as they come, until the stream ends or,
/// with `until_exit_of`, that process's `exit` event; returns that exit's code.
async fn print_streams(
    events: impl futures::Stream<Item = Result<boxwood_client::types::EventView, boxwood_client::ClientError>>,
    until_exit_of: Option<i64>,
) -> anyhow::Result<Option<i64>> {
    futures::pin_mut!(events);
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    while let Some(ev) = events.next().await {
        let ev = ev?;
        match ev.kind {
            EventKind::Stdout | EventKind::Stderr => {
                let bytes = serde_json::from_value::<StreamRepr>(ev.data).map(|r| r.bytes()).unwrap_or_default();
                if ev.kind == EventKind::Stdout {
                    out.write_all(&bytes)?;
                    out.flush()?;
                } else {
                    err.write_all(&bytes)?;
                }
            }
            EventKind::Exit if until_exit_of.is_some() && ev.spid == until_exit_of => {
                return Ok(ev.data.get("code").and_then(serde_json::Value::as_i64));
            }
            _ => {}
        }
    }
    Ok(None)
}

/// `boxwood logs [-f] OP`: the run's output so far (and, following, until it ends).
pub async fn logs(client: &Client, id: &str, follow: bool) -> anyhow::Result<()> {
    print_streams(client.events(id, EventsOptions { follow, ..Default::default() }), None).await.map(drop)
}

/// `boxwood exec OP -- CMD…`: another command in a running instance, streamed; returns its
/// exit code to leave with.
pub async fn exec(client: &Client, id: &str, command: &[String]) -> anyhow::Result<i32> {
    let (command, args, shell) = command_parts(command)?;
    let req = ExecRequest { command, args, shell: Some(shell), ..Default::default() };
    let spid = client.exec(id, &req).await?.spid;
    let opts = EventsOptions { spid: Some(spid), follow: true, ..Default::default() };
    Ok(exit_status(print_streams(client.events(id, opts), Some(spid)).await?))
}

/// An image argument as a UUID: a UUID as it is, else a tag (with or without `tag:`).
async fn image_uuid(client: &Client, image: &str) -> anyhow::Result<String> {
    let r = image_ref(image);
    Ok(match r.strip_prefix("tag:") {
        Some(tag) => client.image_by_tag(tag).await?.uuid,
        None => r,
    })
}

/// `boxwood tag IMAGE TAG`: moves TAG to IMAGE.
pub async fn tag(client: &Client, image: &str, tag: &str) -> anyhow::Result<()> {
    let uuid = image_uuid(client, image).await?;
    let tagged = client.set_tag(&uuid, tag).await?;
    println!("{} is {}", tagged.uuid, tagged.tag.as_deref().unwrap_or(tag));
    Ok(())
}

/// `boxwood ls IMAGE [PATH]`: a directory of an image, without a VM.
pub async fn ls(client: &Client, image: &str, path: &str) -> anyhow::Result<()> {
    let uuid = image_uuid(client, image).await?;
    print!("{}", client.list_dir_text(&uuid, path).await?);
    Ok(())
}

/// `boxwood cat IMAGE PATH`: a file of an image, without a VM, as it streams.
pub async fn cat(client: &Client, image: &str, path: &str) -> anyhow::Result<()> {
    let uuid = image_uuid(client, image).await?;
    let stream = client.download(&uuid, path).await?;
    futures::pin_mut!(stream);
    let mut out = std::io::stdout();
    while let Some(chunk) = stream.next().await {
        out.write_all(&chunk?)?;
    }
    out.flush()?;
    Ok(())
}

/// `boxwood upload FILE`: prints the upload's UUID (what `files` takes) and its SHA-256.
pub async fn upload(client: &Client, file: &std::path::Path) -> anyhow::Result<()> {
    let bytes = tokio::fs::read(file).await.with_context(|| format!("read {}", file.display()))?;
    let up = client.upload(bytes).await?;
    println!("{} {}", up.uuid, up.sha256);
    Ok(())
}

/// `boxwood images`: a table, the lineage as a tree (`--tree`), or JSON.
pub async fn images(client: &Client, tree: bool, json: bool) -> anyhow::Result<()> {
    let list = client.images(&ImageQuery { limit: Some(1000), ..Default::default() }).await?;
    if !tree {
        if json {
            println!("{}", serde_json::to_string_pretty(&list)?);
        } else {
            for i in &list {
                println!("{}  {}  {}", i.uuid, i.created_at, i.tag.as_deref().unwrap_or("-"));
            }
        }
        return Ok(());
    }
    let mut parent_of = BTreeMap::new();
    for i in &list {
        let lineage = client.lineage(&i.uuid).await?;
        parent_of.insert(i.uuid.clone(), lineage.parent);
    }
    let forest = forest(&list, &parent_of);
    if json {
        println!("{}", serde_json::to_string_pretty(&forest)?);
    } else {
        let mut text = String::new();
        for root in &forest {
            draw(root, "", true, true, &mut text);
        }
        print!("{text}");
    }
    Ok(())
}

/// An image and the listed images made from it.
#[derive(Debug, Serialize, PartialEq)]
pub struct Node {
    pub uuid: String,
    pub tag: Option<String>,
    pub children: Vec<Node>,
}

/// The listed images as trees: roots are those whose parent is not listed (or none).
pub fn forest(list: &[ImageView], parent_of: &BTreeMap<String, Option<String>>) -> Vec<Node> {
    let listed: std::collections::HashSet<&str> = list.iter().map(|i| i.uuid.as_str()).collect();
    let mut kids: BTreeMap<&str, Vec<&ImageView>> = BTreeMap::new();
    let mut roots = Vec::new();
    for i in list {
        match parent_of.get(&i.uuid).and_then(Option::as_deref).filter(|p| listed.contains(p)) {
            Some(p) => kids.entry(p).or_default().push(i),
            None => roots.push(i),
        }
    }
    fn build(i: &ImageView, kids: &BTreeMap<&str, Vec<&ImageView>>, depth: usize) -> Node {
        // Lineage is a tree by construction; the bound only guards a server that says otherwise.
        let children = if depth > 256 {
            Vec::new()
        } else {
            kids.get(i.uuid.as_str()).into_iter().flatten().map(|c| build(c, kids, depth + 1)).collect()
        };
        Node { uuid: i.uuid.clone(), tag: i.tag.clone(), children }
    }
    roots.into_iter().map(|r| build(r, &kids, 0)).collect()
}

fn draw(n: &Node, prefix: &str, last: bool, root: bool, out: &mut String) {
    let label = match &n.tag {
        Some(t) => format!("{} ({t})", n.uuid),
        None => n.uuid.clone(),
    };
    let (branch, more) = match (root, last) {
        (true, _) => ("", ""),
        (false, true) => ("└── ", "    "),
        (false, false) => ("├── ", "│   "),
    };
    out.push_str(&format!("{prefix}{branch}{label}\n"));
    let next = format!("{prefix}{more}");
    for (i, c) in n.children.iter().enumerate() {
        draw(c, &next, i + 1 == n.children.len(), false, out);
    }
}

/// `boxwood ps`: operations, newest first.
pub async fn ps(client: &Client, json: bool) -> anyhow::Result<()> {
    let ops = client.operations(&OperationQuery { limit: Some(100), ..Default::default() }).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&ops)?);
    } else {
        for o in &ops {
            println!("{}  {:12}  {:9}  {}", o.uuid, o.kind.as_str(), o.status.as_str(), o.created_at);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(uuid: &str, tag: Option<&str>) -> ImageView {
        ImageView { uuid: uuid.into(), tag: tag.map(Into::into), created_at: String::new(), operation_uuid: None }
    }

    #[test]
    fn images_become_trees_under_their_listed_parents() {
        let list = [img("a", Some("base")), img("b", None), img("c", None), img("d", None)];
        let parent_of = BTreeMap::from([
            ("a".to_owned(), None),
            ("b".to_owned(), Some("a".to_owned())),
            ("c".to_owned(), Some("b".to_owned())),
            ("d".to_owned(), Some("gone".to_owned())),
        ]);
        let f = forest(&list, &parent_of);
        let mut text = String::new();
        for r in &f {
            draw(r, "", true, true, &mut text);
        }
        assert_eq!(text, "a (base)\n└── b\n    └── c\nd\n");
    }

    #[test]
    fn run_flags_become_a_spawn_request() {
        let a = RunArgs {
            image: "python:3.11".into(),
            save: true,
            env: vec!["A=1".into(), "B=x=y".into()],
            cwd: Some("/app".into()),
            timeout: Some(5),
            no_network: false,
            command: vec!["echo $A".into()],
        };
        let r = spawn_request(&a).unwrap();
        assert_eq!((r.image.as_str(), r.disposable, r.timeout), ("tag:python:3.11", Some(false), Some(5)));
        assert_eq!(
            (r.process.command.as_str(), r.process.shell, r.process.args.as_ref()),
            ("echo $A", Some(true), None)
        );
        assert_eq!(r.process.env.unwrap()["B"].as_deref(), Some("x=y"));
        let argv = RunArgs { command: vec!["ls".into(), "-l".into()], env: vec![], ..a };
        let r = spawn_request(&argv).unwrap();
        assert_eq!((r.process.shell, r.process.args), (Some(false), Some(vec!["-l".to_owned()])));
        assert!(spawn_request(&RunArgs { env: vec!["NOEQ".into()], ..argv }).is_err());
        assert_eq!(image_ref("01a2538a-9fd7-71f0-a68e-5d40db323fc4"), "01a2538a-9fd7-71f0-a68e-5d40db323fc4");
    }
}
