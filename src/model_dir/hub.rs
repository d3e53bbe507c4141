//! Hub downloads into the Hugging Face cache layout (`models--ORG--NAME/{blobs,snapshots,refs}`,
//! as `huggingface_hub` and `hf_hub` write it), done here rather than by `hf_hub`'s
//! `ApiRepo::get`: hf-hub 0.4 joins the revision, the `ETag` and the `X-Repo-Commit` header into
//! cache paths unchecked (a hostile or broken `HF_ENDPOINT` mirror could write outside
//! `HF_HOME`), never checks that a transfer got every byte it announced (a truncated download
//! stays in the cache as complete), and `assert!`s / `unwrap`s on some malformed answers. Here
//! every name is validated before it becomes a path, and a file only enters the cache after its
//! size (and the SHA-256 the hub gives for LFS files) matched.

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

const USER_AGENT: &str = concat!("flux2-klein/", env!("CARGO_PKG_VERSION"));
/// The hub's address unless `HF_ENDPOINT` says otherwise.
const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// Relative redirects followed while asking for a file's metadata.
const MAX_REDIRECTS: usize = 5;
/// A hub that does not answer, or a transfer that stalls, is an error rather than a hang.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
const STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// An HTTP client (proxies from the environment, the timeouts above); `follow`: whether it
/// follows redirects.
fn http_agent(follow: bool) -> ureq::Agent {
    let builder = ureq::AgentBuilder::new()
        .try_proxy_from_env(true)
        .timeout_connect(CONNECT_TIMEOUT)
        .timeout_read(STALL_TIMEOUT);
    if follow {
        builder.build()
    } else {
        builder.redirects(0).build()
    }
}

/// One hub repo at one revision, and where its files are cached.
#[derive(Debug)]
pub(super) struct HubRepo {
    endpoint: String,
    repo_id: String,
    revision: String,
    /// `{cache}/models--ORG--NAME`.
    dir: PathBuf,
    token: Option<String>,
    progress: bool,
}

/// What the hub says about one file before it is downloaded.
#[derive(Debug, PartialEq)]
struct FileMeta {
    commit: String,
    etag: String,
    size: u64,
    /// The SHA-256 of the content (the `X-Linked-Etag` of LFS files), when given.
    sha256: Option<String>,
    /// The URL to download (the resolve URL after relative redirects; it may redirect again,
    /// to a CDN, which gets no token).
    location: String,
}

impl HubRepo {
    /// The repo `repo_id` at `revision` (default `main`), cached under `HF_HOME`.
    pub(super) fn new(repo_id: &str, revision: Option<&str>, progress: bool) -> Result<Self> {
        check_repo_id(repo_id)?;
        let revision = revision.unwrap_or("main");
        check_revision(revision)?;
        let cache = hf_hub::Cache::from_env();
        let token = std::env::var("HF_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| cache.token());
        let folder = hf_hub::Repo::model(repo_id.to_string()).folder_name();
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        Ok(Self {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            repo_id: repo_id.to_string(),
            revision: revision.to_string(),
            dir: cache.path().join(folder),
            token,
            progress,
        })
    }

    /// The cached copy of `rel` at this revision, if there is one.
    pub(super) fn cached(&self, rel: &str) -> Option<PathBuf> {
        check_rel_path(rel).ok()?;
        let commit = if is_commit(&self.revision) {
            self.revision.clone()
        } else {
            let text = std::fs::read_to_string(self.dir.join("refs").join(&self.revision)).ok()?;
            let commit = text.trim().to_string();
            is_commit(&commit).then_some(commit)?
        };
        let p = self.dir.join("snapshots").join(commit).join(rel);
        p.is_file().then_some(p)
    }

    /// Downloads `rel` into the cache (checked against the size and SHA-256 the hub
    /// announced) and returns its path in the snapshot.
    pub(super) fn download(&self, rel: &str) -> Result<PathBuf> {
        check_rel_path(rel)?;
        let url = format!(
            "{}/{}/resolve/{}/{rel}",
            self.endpoint,
            self.repo_id,
            self.revision.replace('/', "%2F")
        );
        let meta = self.metadata(&url)?;
        let blobs = self.dir.join("blobs");
        std::fs::create_dir_all(&blobs)
            .with_context(|| format!("cannot create {}", blobs.display()))?;
        let blob = blobs.join(&meta.etag);
        let complete = std::fs::metadata(&blob).is_ok_and(|m| m.is_file() && m.len() == meta.size);
        if !complete {
            self.fetch_blob(rel, &meta, &blob)?;
        }
        let pointer = self.dir.join("snapshots").join(&meta.commit).join(rel);
        link_pointer(&pointer, &meta.etag, rel)?;
        if self.revision != meta.commit {
            write_ref(&self.dir.join("refs").join(&self.revision), &meta.commit)?;
        }
        Ok(pointer)
    }

    /// A GET of `url` on the hub itself, with the token. ureq drops the token when it
    /// follows a redirect, so a CDN (or whatever a mirror redirects to) never sees it.
    fn request(&self, agent: &ureq::Agent, url: &str) -> ureq::Request {
        let mut req = agent.get(url).set("User-Agent", USER_AGENT);
        if let Some(token) = &self.token {
            req = req.set("Authorization", &format!("Bearer {token}"));
        }
        req
    }

    /// The commit, ETag, size and content location of `url` (a one-byte ranged GET, relative
    /// redirects followed, as `huggingface_hub` does).
    fn metadata(&self, url: &str) -> Result<FileMeta> {
        let agent = http_agent(false);
        let mut current = url.to_string();
        let mut response = None;
        for _ in 0..=MAX_REDIRECTS {
            let r = call(self.request(&agent, &current).set("Range", "bytes=0-0"))?;
            let status = r.status();
            let relative = (300..400).contains(&status)
                && r.header("Location").is_some_and(|l| l.starts_with('/'));
            if relative {
                let location = r.header("Location").unwrap_or_default().to_string();
                current = format!("{}{location}", origin(url));
                continue;
            }
            response = Some(r);
            break;
        }
        let r = response.ok_or_else(|| anyhow!("more than {MAX_REDIRECTS} redirects"))?;
        let commit = r
            .header("X-Repo-Commit")
            .ok_or_else(|| anyhow!("the hub's answer has no X-Repo-Commit header"))?
            .trim()
            .to_string();
        if !is_commit(&commit) {
            bail!("the hub answered an invalid commit {commit:?} (expected 40 or 64 hex digits)");
        }
        let linked = r.header("X-Linked-Etag").map(clean_etag);
        let etag = linked
            .clone()
            .or_else(|| r.header("ETag").map(clean_etag))
            .ok_or_else(|| anyhow!("the hub's answer has no ETag header"))?;
        check_etag(&etag)?;
        let sha256 = linked.filter(|e| e.len() == 64 && is_hex(e));
        let status = r.status();
        let size = if (300..400).contains(&status) {
            let location = r
                .header("Location")
                .ok_or_else(|| anyhow!("the hub answered a redirect without a Location"))?;
            match r.header("X-Linked-Size") {
                Some(s) => parse_size(s, "X-Linked-Size")?,
                None => {
                    // Another host: no token.
                    let probe = http_agent(true)
                        .get(location)
                        .set("User-Agent", USER_AGENT)
                        .set("Range", "bytes=0-0");
                    size_of(&call(probe)?)?
                }
            }
        } else {
            size_of(&r)?
        };
        let location = current;
        Ok(FileMeta {
            commit,
            etag,
            size,
            sha256,
            location,
        })
    }

    /// Streams the file into a temporary blob (created exclusively), checks its size and
    /// SHA-256, and renames it into place; on any failure the temporary file is removed.
    fn fetch_blob(&self, rel: &str, meta: &FileMeta, blob: &Path) -> Result<()> {
        let tmp = blob.with_file_name(format!(
            "{}.incomplete-{}-{:08x}",
            meta.etag,
            std::process::id(),
            rand::random::<u32>()
        ));
        let result = (|| -> Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .with_context(|| format!("cannot create {}", tmp.display()))?;
            let response = call(self.request(&http_agent(true), &meta.location))?;
            let bar = self.progress.then(|| {
                let bar = indicatif::ProgressBar::new(meta.size);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bar.set_message(rel.to_string());
                bar
            });
            // One byte more than announced is enough to know the transfer is wrong.
            let mut reader = response.into_reader().take(meta.size + 1);
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 16];
            let mut got = 0u64;
            loop {
                let n = reader.read(&mut buf).with_context(|| {
                    format!("the download of {rel} broke off after {got} bytes")
                })?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n])
                    .with_context(|| format!("cannot write {}", tmp.display()))?;
                got += n as u64;
                if let Some(bar) = &bar {
                    bar.set_position(got);
                }
            }
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            if got != meta.size {
                bail!(
                    "the download of {rel} is incomplete: {got} of the {} bytes the hub announced \
                     (run again to retry)",
                    meta.size
                );
            }
            if let Some(want) = &meta.sha256 {
                let have: String = hasher
                    .finalize()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                if have != *want {
                    bail!(
                        "the download of {rel} is corrupt: SHA-256 {have}, the hub announced {want} \
                         (run again to retry)"
                    );
                }
            }
            file.sync_all()?;
            std::fs::rename(&tmp, blob)
                .with_context(|| format!("cannot rename {} into place", tmp.display()))?;
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// The hub has no such file (HTTP 404): `ModelDir` then tries the next layout.
#[derive(Debug)]
pub(super) struct NotFound(String);

impl std::fmt::Display for NotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP status 404 for {}", self.0)
    }
}

impl std::error::Error for NotFound {}

/// A request's answer; HTTP errors become the status and the URL (the caller adds advice).
fn call(req: ureq::Request) -> Result<ureq::Response> {
    let url = req.url().to_string();
    match req.call() {
        Ok(r) => Ok(r),
        Err(ureq::Error::Status(404, _)) => Err(NotFound(url).into()),
        Err(ureq::Error::Status(code, _)) => bail!("HTTP status {code} for {url}"),
        Err(e) => Err(anyhow!("{e}")),
    }
}

/// `scheme://host[:port]` of a URL (for relative redirects).
fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => &url[..after_scheme + i],
        None => url,
    }
}

/// The full size of a ranged answer (`Content-Range: bytes 0-0/N`), or its length when the
/// server sent everything.
fn size_of(r: &ureq::Response) -> Result<u64> {
    if let Some(range) = r.header("Content-Range") {
        let total = range.rsplit('/').next().unwrap_or_default();
        return parse_size(total, "Content-Range");
    }
    if let Some(size) = r.header("X-Linked-Size") {
        return parse_size(size, "X-Linked-Size");
    }
    match r.header("Content-Length") {
        Some(len) if r.status() == 200 => parse_size(len, "Content-Length"),
        _ => bail!("the hub's answer gives no file size (no Content-Range header)"),
    }
}

fn parse_size(s: &str, header: &str) -> Result<u64> {
    s.trim()
        .parse()
        .map_err(|_| anyhow!("the hub answered an invalid {header} header {s:?}"))
}

/// An ETag without quotes and the weak-validator prefix.
fn clean_etag(e: &str) -> String {
    e.trim().trim_start_matches("W/").replace('"', "")
}

fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A git commit id (SHA-1, or SHA-256 for newer repos).
pub(super) fn is_commit(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && is_hex(s)
}

/// An ETag becomes a file name in `blobs/`: one plain name, nothing else.
fn check_etag(etag: &str) -> Result<()> {
    let ok = !etag.is_empty()
        && etag.len() <= 128
        && !etag.starts_with('.')
        && etag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !ok {
        bail!("the hub answered an invalid ETag {etag:?}; is HF_ENDPOINT a Hugging Face hub?");
    }
    Ok(())
}

/// `ORG/NAME` of letters, digits, `-`, `_` and `.` (as the hub allows).
fn check_repo_id(id: &str) -> Result<()> {
    let ok = id.split('/').count() == 2
        && id.split('/').all(|part| {
            !part.is_empty()
                && part.len() <= 96
                && part != "."
                && part != ".."
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        });
    if !ok {
        bail!("{id:?} is not a Hugging Face repo id (ORG/NAME of letters, digits, '-', '_', '.')");
    }
    Ok(())
}

/// A revision names `refs/REVISION` in the cache: a branch, tag or commit of plain path
/// components (`refs/pr/1` is fine, `..` or an absolute path is not).
pub fn check_revision(rev: &str) -> Result<()> {
    let ok = !rev.is_empty()
        && rev.len() <= 255
        && rev.split('/').all(|part| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(&b))
        });
    if !ok {
        bail!(
            "--revision {rev:?} is not a branch, tag or commit name (letters, digits, '-', '_', \
             '.', '+' and '/' between names; no '..')"
        );
    }
    Ok(())
}

/// A file inside the repo: relative, plain components only.
pub(crate) fn check_rel_path(rel: &str) -> Result<()> {
    let path = Path::new(rel);
    let plain = !rel.is_empty()
        && !rel.contains('\\')
        && !rel.chars().any(char::is_control)
        && path.components().all(|c| matches!(c, Component::Normal(_)));
    if !plain {
        bail!("{rel:?} is not a file inside the model (absolute, with '..' or control characters)");
    }
    Ok(())
}

/// `snapshots/COMMIT/REL` → `../../blobs/ETAG` (one more `..` per directory in `rel`).
fn link_pointer(pointer: &Path, etag: &str, rel: &str) -> Result<()> {
    let parent = pointer
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", pointer.display()))?;
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let depth = Path::new(rel).components().count() + 1;
    let mut target = PathBuf::new();
    for _ in 0..depth {
        target.push("..");
    }
    target.push("blobs");
    target.push(etag);
    if std::fs::symlink_metadata(pointer).is_ok() {
        std::fs::remove_file(pointer)
            .with_context(|| format!("cannot replace {}", pointer.display()))?;
    }
    #[cfg(unix)]
    std::os::unix::fs::symlink(&target, pointer)
        .with_context(|| format!("cannot link {}", pointer.display()))?;
    #[cfg(not(unix))]
    std::fs::copy(parent.join(&target), pointer)
        .with_context(|| format!("cannot copy into {}", pointer.display()))?;
    Ok(())
}

/// `refs/REVISION` = the commit, replaced atomically.
fn write_ref(path: &Path, commit: &str) -> Result<()> {
    let parent = path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", path.display()))?;
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let tmp = parent.join(format!(
        ".ref-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = std::fs::write(&tmp, commit).and_then(|_| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_would_leave_the_cache_are_refused() {
        for bad in ["../x", "a/../../b", "/etc", "", "a//b", "a\0b", "x y"] {
            assert!(check_revision(bad).is_err(), "{bad}");
        }
        for good in ["main", "refs/pr/1", "v1.0", &"a".repeat(40)] {
            check_revision(good).unwrap();
        }
        for bad in ["../etc", "a/b/c", "..", "a/..", ".", "/abs", ""] {
            assert!(
                check_etag(bad).is_err() || check_repo_id(bad).is_err(),
                "{bad}"
            );
        }
        for bad in [
            "../../etc/passwd",
            "/etc/passwd",
            "a/../b",
            "",
            "a\\b",
            "\0a",
        ] {
            assert!(check_rel_path(bad).is_err(), "{bad}");
        }
        check_rel_path("transformer/model-00001.safetensors").unwrap();
        assert!(!is_commit("../../../../tmp/x"));
        assert_eq!(clean_etag("W/\"abc\""), "abc");
        assert_eq!(origin("http://127.0.0.1:8/a/b"), "http://127.0.0.1:8");
    }
}
