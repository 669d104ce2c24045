//! ripgrep-style search of an image (`GET …/grep`), with `grep-regex` / `grep-searcher`
//! over the merged view.
//!
//! * Patterns (Rust regex syntax, linear time) are OR-ed; `case` maps to ripgrep's `-s`,
//!   `-i`, `-S`. Lines are `\n`-terminated.
//! * Each path (a file or a directory, symlinks followed for the path itself) is searched in
//!   the given order; results are concatenated and share `max_total`. Directories are
//!   walked in pre-order, names sorted, without following symlinks, hidden files included,
//!   no ignore files. Only regular files are searched; a file with a NUL byte is binary and
//!   skipped whole (its matches are dropped even if the NUL comes after them).
//! * Globs have ripgrep `-g` semantics (gitignore lines with `!` inverted) on the path
//!   relative to the searched directory: a glob without `/` matches the basename at any
//!   depth; when any non-negated glob is given, files matching none are skipped; a negated
//!   glob matching a directory prunes it. Like ripgrep, globs do not filter a path given
//!   explicitly as a file.
//! * `max_total` counts match lines (context lines ride along with their match);
//!   `truncated` is set when one more match than `max_total` exists, or the deadline hits.
//!   `line_text` is lossy UTF-8 of at most 4096 bytes of the line; `line_bytes`, offsets and
//!   submatch `start`/`end` are in bytes of the raw line.

use std::cell::Cell;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use grep_matcher::Matcher;
use grep_regex::{RegexMatcher, RegexMatcherBuilder};
use grep_searcher::{BinaryDetection, Searcher, SearcherBuilder, Sink, SinkContext, SinkContextKind, SinkMatch};
use ignore::overrides::{Override, OverrideBuilder};
use serde::{Deserialize, Serialize};

use super::{Entry, ImageView};
use crate::{ImageError, ImageResult};

const MAX_PATTERNS: usize = 16;
const MAX_PATTERN_CHARS: usize = 1024;
const MAX_PATHS: usize = 16;
const MAX_GLOBS: usize = 64;
const MAX_COUNT: u64 = 10_000;
const MAX_TOTAL: u64 = 10_000;
const MAX_CONTEXT: usize = 50;
const MAX_LINE_TEXT: usize = 4096;
/// Submatches reported per line at most (a pattern like `.` matches every byte).
const MAX_SUBMATCHES: usize = 1024;

/// Case sensitivity of the patterns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrepCase {
    #[default]
    Sensitive,
    Insensitive,
    /// Insensitive unless a pattern has an uppercase letter (ripgrep `--smart-case`).
    Smart,
}

impl FromStr for GrepCase {
    type Err = ImageError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sensitive" => Ok(Self::Sensitive),
            "insensitive" => Ok(Self::Insensitive),
            "smart" => Ok(Self::Smart),
            other => {
                Err(ImageError::BadRequest(format!("case must be sensitive, insensitive or smart, not {other:?}")))
            }
        }
    }
}

/// A search request; [`GrepRequest::default`] has the API defaults (path `/`, 1000 results,
/// case-sensitive, no context, a 10 s deadline).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrepRequest {
    /// 1..=16 patterns of at most 1024 characters, OR-ed.
    pub patterns: Vec<String>,
    /// At most 16 files or directories; empty means `["/"]`.
    pub paths: Vec<String>,
    /// ripgrep `-g` globs (at most 64); a leading `!` excludes.
    pub globs: Vec<String>,
    /// Match lines per file, 1..=10000.
    pub max_count: Option<u64>,
    /// Match lines in all, 1..=10000 (larger values are capped).
    pub max_total: u64,
    pub case: GrepCase,
    /// Context lines before / after each match, 0..=50.
    pub before: usize,
    pub after: usize,
    /// Wall-clock budget; when spent, the result so far is returned as truncated.
    pub timeout: Duration,
}

impl Default for GrepRequest {
    fn default() -> Self {
        Self {
            patterns: Vec::new(),
            paths: Vec::new(),
            globs: Vec::new(),
            max_count: None,
            max_total: 1000,
            case: GrepCase::Sensitive,
            before: 0,
            after: 0,
            timeout: Duration::from_secs(10),
        }
    }
}

/// The `GrepResult` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GrepResult {
    /// The first searched path, as requested.
    pub path: String,
    pub patterns: Vec<String>,
    pub matches: Vec<GrepMatch>,
    pub truncated: bool,
}

/// One reported line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GrepMatch {
    /// Absolute path of the file in the image.
    pub path: String,
    pub line_number: u64,
    /// Byte offset of the line's start in the file.
    pub absolute_offset: u64,
    /// The line with its terminator, lossy UTF-8 of at most 4096 bytes.
    pub line_text: String,
    /// The real length of the line in bytes (terminator included).
    pub line_bytes: u64,
    /// Matches within the line; empty for context lines.
    pub submatches: Vec<GrepSubmatch>,
    /// `"match"` or `"context"`.
    #[serde(rename = "type")]
    pub kind: GrepLineKind,
}

/// What a reported line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GrepLineKind {
    Match,
    Context,
}

/// One match within a line: its text and byte range in the line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GrepSubmatch {
    pub text: String,
    pub start: u64,
    pub end: u64,
}

pub(super) fn grep(view: &ImageView, req: &GrepRequest) -> ImageResult<GrepResult> {
    let started = Instant::now();
    let (matcher, globs, max_total) = validate(req)?;
    let default_paths = ["/".to_owned()];
    let paths = if req.paths.is_empty() { &default_paths[..] } else { &req.paths[..] };
    let roots = paths.iter().map(|p| view.resolve(p, true)).collect::<ImageResult<Vec<_>>>()?;
    let searcher = SearcherBuilder::new()
        .line_number(true)
        .before_context(req.before)
        .after_context(req.after)
        .binary_detection(BinaryDetection::quit(0))
        .max_matches(req.max_count)
        .build();
    let mut run = Run {
        matcher,
        searcher,
        globs,
        deadline: started + req.timeout,
        budget: max_total,
        matches: Vec::new(),
        truncated: false,
    };
    for (path, root) in paths.iter().zip(roots) {
        if run.truncated {
            break;
        }
        run.search_root(view, &display_path(path), root)?;
    }
    Ok(GrepResult {
        path: paths[0].clone(),
        patterns: req.patterns.clone(),
        matches: run.matches,
        truncated: run.truncated,
    })
}

/// Checks the limits; builds the matcher and the glob overrides; the effective `max_total`.
fn validate(req: &GrepRequest) -> ImageResult<(RegexMatcher, Override, u64)> {
    let bad = |msg: String| Err(ImageError::BadRequest(msg));
    if req.patterns.is_empty() || req.patterns.len() > MAX_PATTERNS {
        return bad(format!("between 1 and {MAX_PATTERNS} patterns are required"));
    }
    if req.patterns.iter().any(|p| p.chars().count() > MAX_PATTERN_CHARS) {
        return bad(format!("a pattern is longer than {MAX_PATTERN_CHARS} characters"));
    }
    if req.paths.len() > MAX_PATHS {
        return bad(format!("at most {MAX_PATHS} paths"));
    }
    if req.globs.len() > MAX_GLOBS || req.globs.iter().any(|g| g.chars().count() > MAX_PATTERN_CHARS) {
        return bad(format!("at most {MAX_GLOBS} globs of at most {MAX_PATTERN_CHARS} characters"));
    }
    if req.max_count.is_some_and(|n| !(1..=MAX_COUNT).contains(&n)) {
        return bad(format!("max_count must be between 1 and {MAX_COUNT}"));
    }
    if req.max_total == 0 {
        return bad("max_total must be at least 1".into());
    }
    if req.before > MAX_CONTEXT || req.after > MAX_CONTEXT {
        return bad(format!("before and after must be between 0 and {MAX_CONTEXT}"));
    }
    let matcher = RegexMatcherBuilder::new()
        .case_insensitive(req.case == GrepCase::Insensitive)
        .case_smart(req.case == GrepCase::Smart)
        .line_terminator(Some(b'\n'))
        .build_many(&req.patterns)
        .map_err(|e| ImageError::BadRequest(format!("invalid pattern: {e}")))?;
    let mut globs = OverrideBuilder::new(".");
    for glob in &req.globs {
        globs.add(glob).map_err(|e| ImageError::BadRequest(format!("invalid glob {glob:?}: {e}")))?;
    }
    let globs = globs.build().map_err(|e| ImageError::BadRequest(format!("invalid globs: {e}")))?;
    Ok((matcher, globs, req.max_total.min(MAX_TOTAL)))
}

/// A requested path as an absolute, lexically normalised image path (for match paths).
fn display_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    format!("/{}", parts.join("/"))
}

struct Run {
    matcher: RegexMatcher,
    searcher: Searcher,
    globs: Override,
    deadline: Instant,
    /// Match lines that may still be reported.
    budget: u64,
    matches: Vec<GrepMatch>,
    truncated: bool,
}

impl Run {
    /// Searches one requested path: the file itself, or the tree below the directory.
    fn search_root(&mut self, view: &ImageView, display: &str, root: Entry) -> ImageResult<()> {
        if !root.is_dir() {
            if root.is_file() {
                self.search_file(view, &root, display.to_owned());
            }
            return Ok(());
        }
        // pre-order: children pushed in reverse so they pop sorted
        let mut pending: Vec<(Entry, PathBuf)> = Vec::new();
        let push_children = |pending: &mut Vec<(Entry, PathBuf)>, dir: &Entry, rel: &Path| -> ImageResult<()> {
            for child in view.children(dir)?.into_iter().rev() {
                let Some(name) = child.rel.file_name() else { continue };
                let rel = rel.join(name);
                pending.push((child, rel));
            }
            Ok(())
        };
        push_children(&mut pending, &root, Path::new(""))?;
        while let Some((entry, rel)) = pending.pop() {
            if self.truncated {
                break;
            }
            if Instant::now() >= self.deadline {
                self.truncated = true;
                break;
            }
            if entry.is_dir() {
                if !self.globs.matched(&rel, true).is_ignore() {
                    push_children(&mut pending, &entry, &rel)?;
                }
            } else if entry.is_file() && !self.globs.matched(&rel, false).is_ignore() {
                let base = display.trim_end_matches('/');
                self.search_file(view, &entry, format!("{base}/{}", rel.to_string_lossy()));
            }
        }
        Ok(())
    }

    /// Searches one regular file, appending its lines unless it turns out binary. Files that
    /// cannot be read are skipped.
    fn search_file(&mut self, view: &ImageView, entry: &Entry, path: String) {
        let file = view.file_of(entry);
        let expired = Cell::new(false);
        let reader = DeadlineReader { file, deadline: self.deadline, expired: &expired };
        let mut sink = FileSink {
            matcher: &self.matcher,
            path,
            deadline: self.deadline,
            budget: self.budget,
            found: 0,
            lines: Vec::new(),
            binary: false,
            over_budget: false,
            expired: false,
        };
        if let Err(e) = self.searcher.search_reader(&self.matcher, reader, &mut sink) {
            tracing::debug!(path = sink.path, error = %e, "grep: skipping file after a read error");
            return;
        }
        if expired.get() || sink.expired || sink.over_budget {
            self.truncated = true;
        }
        if sink.binary {
            return;
        }
        self.budget -= sink.found;
        self.matches.append(&mut sink.lines);
    }
}

/// A file reader that reports end of file once the deadline has passed (so one huge file
/// cannot hold the search past it), noting that it did.
struct DeadlineReader<'a> {
    file: crate::erofs::ErofsReader,
    deadline: Instant,
    expired: &'a Cell<bool>,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if Instant::now() >= self.deadline {
            self.expired.set(true);
            return Ok(0);
        }
        self.file.read(buf)
    }
}

/// Collects the lines of one file.
struct FileSink<'a> {
    matcher: &'a RegexMatcher,
    path: String,
    deadline: Instant,
    /// Match lines this file may still add.
    budget: u64,
    /// Match lines added.
    found: u64,
    lines: Vec<GrepMatch>,
    binary: bool,
    /// A match beyond the budget was seen: the result is truncated.
    over_budget: bool,
    expired: bool,
}

impl FileSink<'_> {
    fn line(&self, line: &[u8], line_number: Option<u64>, offset: u64, kind: GrepLineKind) -> GrepMatch {
        let mut submatches = Vec::new();
        if kind == GrepLineKind::Match {
            let haystack = line.strip_suffix(b"\n").unwrap_or(line);
            let _ = self.matcher.find_iter(haystack, |m| {
                submatches.push(GrepSubmatch {
                    text: String::from_utf8_lossy(&haystack[m]).into_owned(),
                    start: m.start() as u64,
                    end: m.end() as u64,
                });
                submatches.len() < MAX_SUBMATCHES
            });
        }
        GrepMatch {
            path: self.path.clone(),
            line_number: line_number.unwrap_or(0),
            absolute_offset: offset,
            line_text: String::from_utf8_lossy(&line[..line.len().min(MAX_LINE_TEXT)]).into_owned(),
            line_bytes: line.len() as u64,
            submatches,
            kind,
        }
    }

    fn past_deadline(&mut self) -> bool {
        self.expired = Instant::now() >= self.deadline;
        self.expired
    }
}

impl Sink for FileSink<'_> {
    type Error = io::Error;

    fn matched(&mut self, _: &Searcher, mat: &SinkMatch<'_>) -> Result<bool, io::Error> {
        if self.past_deadline() {
            return Ok(false);
        }
        let mut offset = mat.absolute_byte_offset();
        for (i, line) in mat.lines().enumerate() {
            if self.found >= self.budget {
                self.over_budget = true;
                return Ok(false);
            }
            let number = mat.line_number().map(|n| n + i as u64);
            self.lines.push(self.line(line, number, offset, GrepLineKind::Match));
            self.found += 1;
            offset += line.len() as u64;
        }
        Ok(true)
    }

    fn context(&mut self, _: &Searcher, ctx: &SinkContext<'_>) -> Result<bool, io::Error> {
        if self.past_deadline() {
            return Ok(false);
        }
        // Once the budget is spent, only the after-context of the last reported match is
        // kept; a before-context would belong to a match that will not be reported.
        if self.found < self.budget || *ctx.kind() == SinkContextKind::After {
            self.lines.push(self.line(
                ctx.bytes(),
                ctx.line_number(),
                ctx.absolute_byte_offset(),
                GrepLineKind::Context,
            ));
        }
        Ok(true)
    }

    fn binary_data(&mut self, _: &Searcher, _binary_byte_offset: u64) -> Result<bool, io::Error> {
        self.binary = true;
        Ok(false)
    }
}
