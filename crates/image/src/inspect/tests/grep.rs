//! Search over the merged view.

use std::time::Duration;

use super::fixture;
use crate::ImageError;
use crate::inspect::{GrepCase, GrepLineKind, GrepRequest, GrepResult, ImageView};

fn req(patterns: &[&str], paths: &[&str]) -> GrepRequest {
    GrepRequest {
        patterns: patterns.iter().map(|p| (*p).to_owned()).collect(),
        paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        ..GrepRequest::default()
    }
}

/// `path:line` of every reported line, context lines marked with `-`.
fn hits(result: &GrepResult) -> Vec<String> {
    result
        .matches
        .iter()
        .map(|m| match m.kind {
            GrepLineKind::Match => format!("{}:{}", m.path, m.line_number),
            GrepLineKind::Context => format!("{}-{}", m.path, m.line_number),
        })
        .collect()
}

fn grep(view: &ImageView, req: &GrepRequest) -> Vec<String> {
    hits(&view.grep(req).unwrap())
}

const ALL_ROOT: [&str; 7] = [
    "/etc/group:1",
    "/etc/passwd:1",
    "/opt/data/c.txt:1",
    "/srv/.hidden:1",
    "/srv/link/hard1:1",
    "/srv/link/hard2:1",
    "/usr/share/doc/notes.md:2",
];

#[test]
fn grep_walks_the_merged_view_without_following_symlinks() {
    let fx = fixture();
    let view = fx.view();
    // whiteouts and opaque dirs hide files, binary files and symlinks are skipped, hidden
    // files are searched
    let result = view.grep(&req(&["root"], &[])).unwrap();
    assert_eq!(hits(&result), ALL_ROOT);
    assert!(!result.truncated);
    assert_eq!(result.path, "/");
    let passwd = &result.matches[1];
    assert_eq!((passwd.absolute_offset, passwd.line_bytes), (0, 30));
    assert_eq!(passwd.line_text, "root:x:0:0:root:/root:/bin/sh\n");
    let spans: Vec<(u64, u64, &str)> = passwd.submatches.iter().map(|s| (s.start, s.end, s.text.as_str())).collect();
    assert_eq!(spans, [(0, 4, "root"), (11, 15, "root"), (17, 21, "root")]);
    let notes = &result.matches[6];
    assert_eq!((notes.absolute_offset, notes.line_text.as_str()), (9, "TODO root\n"));
    assert_eq!((notes.submatches[0].start, notes.submatches[0].end), (5, 9));
    let json = serde_json::to_value(&result).unwrap();
    assert_eq!(json["matches"][0]["type"], "match");
    assert_eq!(json["matches"][0]["path"], "/etc/group");
    let mut keys: Vec<&str> = json["matches"][0].as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["absolute_offset", "line_bytes", "line_number", "line_text", "path", "submatches", "type"]);
    assert_eq!(json["matches"][0]["submatches"][0], serde_json::json!({"text": "root", "start": 0, "end": 4}));

    // symlinks are never followed while walking, but a path given explicitly is
    assert_eq!(grep(&view, &req(&["alice"], &["/"])), ["/etc/passwd:2"]);
    assert!(grep(&view, &req(&["alice"], &["/srv"])).is_empty());
    assert_eq!(grep(&view, &req(&["alice"], &["/etc/x"])), ["/etc/x:2"]);
    assert_eq!(grep(&view, &req(&["MAIN"], &["/bin/sh"])), ["/bin/sh:2"]);
    assert_eq!(grep(&view, &req(&["readme|notes|Hello"], &["/etc/lib"])), ["/etc/lib/doc/readme.txt:1"]);
    // binary files are skipped whole, even for matches before the NUL
    assert!(grep(&view, &req(&["root here", "binary"], &["/data"])).is_empty());
    // no match, missing path
    let none = view.grep(&req(&["no such text"], &["/etc"])).unwrap();
    assert!(none.matches.is_empty() && !none.truncated);
    assert!(matches!(view.grep(&req(&["x"], &["/etc", "/nope"])), Err(ImageError::NotFound { .. })));
    assert!(matches!(view.grep(&req(&["x"], &["/dangling"])), Err(ImageError::NotFound { .. })));
    assert!(grep(&view, &req(&["x"], &["/srv/fifo"])).is_empty(), "a FIFO is not opened");
}

#[test]
fn grep_patterns_paths_and_case() {
    let fx = fixture();
    let view = fx.view();
    let result = view.grep(&req(&["BUSYBOX", "localhost|boxwood"], &["/etc/hosts", "/bin"])).unwrap();
    assert_eq!(hits(&result), ["/etc/hosts:1", "/bin/busybox:2"]);
    assert_eq!(result.path, "/etc/hosts");
    assert_eq!(result.patterns, ["BUSYBOX", "localhost|boxwood"]);
    assert_eq!(result.matches[1].submatches[0].text, "BUSYBOX");

    let doc = "/usr/share/doc/readme.txt";
    let with_case = |pattern: &str, case: GrepCase| grep(&view, &GrepRequest { case, ..req(&[pattern], &[doc]) }).len();
    assert_eq!(with_case("hello", GrepCase::Sensitive), 1);
    assert_eq!(with_case("hello", GrepCase::Insensitive), 3);
    assert_eq!(with_case("hello", GrepCase::Smart), 3);
    assert_eq!(with_case("Hello", GrepCase::Smart), 1);
    assert_eq!("smart".parse::<GrepCase>().unwrap(), GrepCase::Smart);
    assert!(matches!("loud".parse::<GrepCase>(), Err(ImageError::BadRequest(_))));
}

#[test]
fn grep_globs_follow_ripgrep() {
    let fx = fixture();
    let view = fx.view();
    let with_globs = |path: &str, globs: &[&str]| {
        grep(&view, &GrepRequest { globs: globs.iter().map(|g| (*g).to_owned()).collect(), ..req(&["root"], &[path]) })
    };
    assert_eq!(with_globs("/", &["*.md"]), ["/usr/share/doc/notes.md:2"]);
    assert_eq!(with_globs("/", &["*.md", "passwd"]), ["/etc/passwd:1", "/usr/share/doc/notes.md:2"]);
    // negation: a file glob and a directory glob (which prunes the directory)
    assert_eq!(
        with_globs("/", &["!*.txt", "!etc", "!hard2"]),
        ["/srv/.hidden:1", "/srv/link/hard1:1", "/usr/share/doc/notes.md:2"]
    );
    // a glob with a slash is anchored at the searched directory
    assert_eq!(with_globs("/srv", &["link/*"]), ["/srv/link/hard1:1", "/srv/link/hard2:1"]);
    assert!(with_globs("/", &["link/*"]).is_empty());
    assert_eq!(with_globs("/", &["srv/**"]).len(), 3);
    assert_eq!(with_globs("/", &["**/link/hard?", "!hard1"]), ["/srv/link/hard2:1"]);
    // globs do not filter a file given explicitly
    assert_eq!(with_globs("/etc/passwd", &["*.md"]), ["/etc/passwd:1"]);
}

#[test]
fn grep_context_and_limits() {
    let fx = fixture();
    let view = fx.view();
    let notes = "/usr/share/doc/notes.md";
    let ctx = view.grep(&GrepRequest { before: 1, after: 1, ..req(&["TODO"], &[notes]) }).unwrap();
    assert_eq!(hits(&ctx), [format!("{notes}-1"), format!("{notes}:2"), format!("{notes}-3")]);
    assert!(ctx.matches[0].submatches.is_empty());
    assert_eq!((ctx.matches[2].line_text.as_str(), ctx.matches[2].absolute_offset), ("line three\n", 19));
    let json = serde_json::to_value(&ctx).unwrap();
    assert_eq!(json["matches"][0]["type"], "context");

    // max_count is per file
    assert_eq!(grep(&view, &GrepRequest { max_count: Some(1), ..req(&["line"], &[notes]) }), [format!("{notes}:1")]);
    let per_file = grep(&view, &GrepRequest { max_count: Some(1), ..req(&["root|alice"], &["/etc"]) });
    assert_eq!(per_file, ["/etc/group:1", "/etc/passwd:1"]);

    // max_total is shared by all paths; truncated only when more matches exist
    let limited = view.grep(&GrepRequest { max_total: 3, ..req(&["root"], &[]) }).unwrap();
    assert_eq!(hits(&limited), ALL_ROOT[..3]);
    assert!(limited.truncated);
    let exact = view.grep(&GrepRequest { max_total: 7, ..req(&["root"], &[]) }).unwrap();
    assert_eq!((exact.matches.len(), exact.truncated), (7, false));
    let shared = view.grep(&GrepRequest { max_total: 2, ..req(&["root"], &["/srv", "/etc"]) }).unwrap();
    assert_eq!(hits(&shared), ["/srv/.hidden:1", "/srv/link/hard1:1"]);
    assert!(shared.truncated);
    // the after-context of the last reported match is kept
    let tail = view.grep(&GrepRequest { max_total: 1, after: 1, ..req(&["line"], &[notes]) }).unwrap();
    assert_eq!(hits(&tail), [format!("{notes}:1"), format!("{notes}-2")]);
    assert!(tail.truncated);

    // the deadline truncates
    let late = view.grep(&GrepRequest { timeout: Duration::ZERO, ..req(&["root"], &[]) }).unwrap();
    assert!(late.truncated && late.matches.is_empty());
}

#[test]
fn grep_rejects_bad_requests() {
    let fx = fixture();
    let view = fx.view();
    let long = "a".repeat(1025);
    let seventeen: Vec<String> = (0..17).map(|i| format!("p{i}")).collect();
    let bad = [
        req(&[], &[]),
        GrepRequest { patterns: seventeen.clone(), ..GrepRequest::default() },
        req(&[&long], &[]),
        req(&["(unclosed"], &[]),
        req(&["a\nb"], &[]),
        GrepRequest { paths: seventeen, ..req(&["x"], &[]) },
        GrepRequest { max_count: Some(0), ..req(&["x"], &[]) },
        GrepRequest { max_count: Some(10_001), ..req(&["x"], &[]) },
        GrepRequest { max_total: 0, ..req(&["x"], &[]) },
        GrepRequest { before: 51, ..req(&["x"], &[]) },
        GrepRequest { after: 51, ..req(&["x"], &[]) },
        GrepRequest { globs: vec!["[".into()], ..req(&["x"], &[]) },
    ];
    for (i, request) in bad.iter().enumerate() {
        assert!(matches!(view.grep(request), Err(ImageError::BadRequest(_))), "case {i}");
    }
    assert!(view.grep(&req(&[&"a".repeat(1024)], &[])).is_ok());
    assert!(view.grep(&GrepRequest { max_total: 50_000, ..req(&["root"], &[]) }).is_ok(), "capped, not refused");
}
