//! Model files and the hub (issue #23): shard indices that name files outside their component,
//! weight files that are truncated or hold integer / unscaled fp8 tensors, and a hub (a fake
//! one on 127.0.0.1, through `HF_ENDPOINT`) that answers hostile names, short transfers or a
//! wrong SHA-256. Each is one `error:` line from `fetch`, nothing kept in the cache, no panic.

#[path = "common/cli.rs"]
#[allow(dead_code)]
mod cli;
mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use cli::{assert_error_line, command_in, stderr};
use common::TempDir;

/// Exit `code`, one `error:` line holding every needle, no panic.
fn assert_error(o: &Output, code: i32, needles: &[&str]) -> String {
    assert!(!stderr(o).contains("panicked"), "{}", stderr(o));
    assert_error_line(o, code, needles)
}

/// A safetensors file of `(name, dtype, shape)` tensors (zero bytes), optionally cut short.
fn safetensors(tensors: &[(&str, &str, &[u64])], truncate: usize) -> Vec<u8> {
    let size = |dtype: &str| match dtype {
        "F32" | "I32" => 4,
        "BF16" | "F16" | "I16" => 2,
        "I64" => 8,
        _ => 1,
    };
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, dtype, shape) in tensors {
        let n: u64 = shape.iter().product::<u64>() * size(dtype);
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let text = serde_json::Value::Object(header).to_string();
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(text.as_bytes());
    bytes.resize(bytes.len() + offset as usize - truncate, 0);
    bytes
}

fn good_weights() -> Vec<u8> {
    safetensors(&[("a.weight", "BF16", &[4, 4])], 0)
}

/// The files `fetch` reads: `{}` configs (fetch parses without validating), a tokenizer file
/// and a small weight file per component, with `overrides` replacing or adding files.
fn model_files(overrides: &[(&str, Vec<u8>)]) -> HashMap<String, Vec<u8>> {
    let mut files: HashMap<String, Vec<u8>> = [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "transformer/config.json",
        "vae/config.json",
    ]
    .iter()
    .map(|f| (f.to_string(), b"{}".to_vec()))
    .collect();
    files.insert("tokenizer/tokenizer.json".into(), b"{}".to_vec());
    // The one key `fetch` checks in model_index.json: which pipeline the checkpoint is.
    files.insert(
        "model_index.json".into(),
        br#"{"_class_name": "Flux2KleinPipeline"}"#.to_vec(),
    );
    for c in [
        "text_encoder/model",
        "transformer/diffusion_pytorch_model",
        "vae/diffusion_pytorch_model",
    ] {
        files.insert(format!("{c}.safetensors"), good_weights());
    }
    for (name, bytes) in overrides {
        files.insert(name.to_string(), bytes.clone());
    }
    files
}

fn write_model(dir: &Path, files: &HashMap<String, Vec<u8>>) {
    for (name, bytes) in files {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
}

fn shard_index(shard: &str) -> Vec<u8> {
    serde_json::json!({"metadata": {}, "weight_map": {"a.weight": shard}})
        .to_string()
        .into_bytes()
}

/// `fetch -q -m MODEL` for a local model made of `files` (the transformer's weights
/// replaced by `overrides`).
fn fetch_local(name: &str, overrides: &[(&str, Vec<u8>)], remove: &[&str]) -> Output {
    let tmp = TempDir::new(name);
    let model = tmp.join("model");
    let mut files = model_files(overrides);
    for r in remove {
        files.remove(*r);
    }
    write_model(&model, &files);
    command_in(tmp.path(), &["fetch", "-q", "-m", model.to_str().unwrap()])
        .output()
        .unwrap()
}

#[test]
fn local_model_with_good_files_fetches() {
    let o = fetch_local("mf-good", &[], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn local_shard_index_outside_the_component_is_refused() {
    for shard in [
        "../../etc/passwd",
        "/etc/passwd",
        "../vae/diffusion_pytorch_model.safetensors",
    ] {
        let o = fetch_local(
            "mf-shard",
            &[(
                "transformer/diffusion_pytorch_model.safetensors.index.json",
                shard_index(shard),
            )],
            &["transformer/diffusion_pytorch_model.safetensors"],
        );
        assert_error(&o, 1, &["shard", "damaged or hostile", "transformer"]);
    }
}

#[test]
fn integer_and_bool_weights_are_refused() {
    for dtype in ["I64", "U8", "I16", "BOOL"] {
        let weights = safetensors(&[("a.weight", dtype, &[4, 4])], 0);
        let o = fetch_local(
            "mf-int",
            &[("transformer/diffusion_pytorch_model.safetensors", weights)],
            &[],
        );
        assert_error(&o, 1, &[dtype, "not a weight dtype", "transformer"]);
    }
    // BatchNorm's step counter (in every diffusers VAE checkpoint) is not a weight.
    let bn = safetensors(
        &[
            ("a.weight", "BF16", &[2]),
            ("bn.num_batches_tracked", "I64", &[]),
        ],
        0,
    );
    let o = fetch_local(
        "mf-bn",
        &[("vae/diffusion_pytorch_model.safetensors", bn)],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn fp8_weights_without_scales_are_refused() {
    let weights = safetensors(&[("blk.linear.weight", "F8_E4M3", &[4, 4])], 0);
    let o = fetch_local(
        "mf-f8",
        &[("transformer/diffusion_pytorch_model.safetensors", weights)],
        &[],
    );
    assert_error(&o, 1, &["F8_E4M3", "blk.linear.weight_scale"]);
}

#[test]
fn truncated_local_weights_are_refused() {
    let weights = safetensors(&[("a.weight", "F32", &[64, 64])], 100);
    let o = fetch_local(
        "mf-trunc",
        &[("text_encoder/model.safetensors", weights)],
        &[],
    );
    assert_error(&o, 1, &["truncated", "download it again", "text_encoder"]);
    let o = fetch_local(
        "mf-garbage",
        &[(
            "vae/diffusion_pytorch_model.safetensors",
            b"<html>404</html>".to_vec(),
        )],
        &[],
    );
    assert_error(&o, 1, &["not a safetensors file", "vae"]);
}

// ---- A fake hub. ----

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// How the fake hub answers for one file.
#[derive(Clone, Default)]
struct Answer {
    commit: Option<String>,
    etag: Option<String>,
    linked_etag: Option<String>,
    /// The size announced in `Content-Range` (default: the real one).
    announced: Option<usize>,
    /// Answer as the hub does for LFS files: a redirect to `/cdn/FILE` on the same server,
    /// the size and SHA-256 in `X-Linked-Size` / `X-Linked-Etag`.
    lfs: bool,
}

type Answers = HashMap<String, Answer>;

/// Serves `files` as `/org/name/resolve/REV/FILE` (404 for others) on 127.0.0.1 until the
/// test process ends; returns the endpoint URL.
fn fake_hub(files: HashMap<String, Vec<u8>>, answers: Answers) -> String {
    fake_hub_seeing_tokens(files, answers).0
}

/// [`fake_hub`], and a flag raised when the CDN side (`/cdn/…`) is sent an `Authorization`.
fn fake_hub_seeing_tokens(
    files: HashMap<String, Vec<u8>>,
    answers: Answers,
) -> (String, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let files = Arc::new(files);
    let answers = Arc::new(answers);
    let leaked = Arc::new(AtomicBool::new(false));
    let (base, seen) = (url.clone(), leaked.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let (files, answers, base, seen) =
                (files.clone(), answers.clone(), base.clone(), seen.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                reader.read_line(&mut request_line).unwrap_or(0);
                let (mut ranged, mut auth) = (false, false);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    ranged |= line.to_ascii_lowercase().starts_with("range:");
                    auth |= line.to_ascii_lowercase().starts_with("authorization:");
                }
                let path = request_line.split(' ').nth(1).unwrap_or("").to_string();
                if let Some(rel) = path.strip_prefix("/cdn/") {
                    seen.fetch_or(auth, Ordering::SeqCst);
                    let body = files.get(rel).cloned().unwrap_or_default();
                    let _ = stream.write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        )
                        .as_bytes(),
                    );
                    let _ = stream.write_all(&body);
                    return;
                }
                let rel = path.splitn(6, '/').nth(5).unwrap_or("").to_string();
                let Some(body) = files.get(&rel) else {
                    let _ = stream.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    return;
                };
                let a = answers.get(&rel).cloned().unwrap_or_default();
                let mut head = format!(
                    "X-Repo-Commit: {}\r\nETag: \"{}\"\r\n",
                    a.commit.as_deref().unwrap_or(COMMIT),
                    a.etag
                        .unwrap_or_else(|| format!("e{:x}", rel.len() * 7919 + body.len()))
                );
                if let Some(l) = &a.linked_etag {
                    head += &format!("X-Linked-Etag: \"{l}\"\r\n");
                }
                if a.lfs {
                    let sha: String = Sha256::digest(body)
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect();
                    let _ = stream.write_all(
                        format!(
                            "HTTP/1.1 302 Found\r\n{head}X-Linked-Etag: \"{sha}\"\r\n\
                             X-Linked-Size: {}\r\nLocation: {base}/cdn/{rel}\r\n\
                             Content-Length: 0\r\nConnection: close\r\n\r\n",
                            body.len()
                        )
                        .as_bytes(),
                    );
                    return;
                }
                let total = a.announced.unwrap_or(body.len());
                let (status, body): (&str, &[u8]) = if ranged {
                    head += &format!("Content-Range: bytes 0-0/{total}\r\n");
                    ("206 Partial Content", &body[..1.min(body.len())])
                } else {
                    ("200 OK", body)
                };
                let _ = stream.write_all(
                    format!(
                        "HTTP/1.1 {status}\r\n{head}Content-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .as_bytes(),
                );
                let _ = stream.write_all(body);
            });
        }
    });
    (url, leaked)
}

/// `fetch -q -m org/name` against a fake hub serving `files`, with an empty cache in `tmp`.
fn fetch_hub(tmp: &TempDir, endpoint: &str, extra: &[&str]) -> Output {
    let mut args = vec!["fetch", "-q", "-m", "org/name"];
    args.extend_from_slice(extra);
    let mut cmd = command_in(tmp.path(), &args);
    cmd.env_remove("HF_HUB_OFFLINE")
        .env("HF_ENDPOINT", endpoint);
    for proxy in [
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "all_proxy",
    ] {
        cmd.env_remove(proxy);
    }
    cmd.output().unwrap()
}

/// Every file under `dir` (recursively), relative, sorted; symlinks listed as files.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn repo_cache(tmp: &TempDir) -> PathBuf {
    tmp.join(".hf-home/hub/models--org--name")
}

#[test]
fn hub_download_fills_the_cache_and_then_works_offline() {
    let tmp = TempDir::new("mf-hub-good");
    let hub = fake_hub(model_files(&[]), Answers::new());
    let o = fetch_hub(&tmp, &hub, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let snapshot = repo_cache(&tmp).join("snapshots").join(COMMIT);
    assert_eq!(
        std::fs::read(snapshot.join("transformer/config.json")).unwrap(),
        b"{}"
    );
    assert_eq!(
        std::fs::read_to_string(repo_cache(&tmp).join("refs/main")).unwrap(),
        COMMIT
    );
    // The cache as written is what an offline run reads.
    let o = command_in(tmp.path(), &["fetch", "-q", "-m", "org/name"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains(COMMIT));
}

#[test]
fn hub_shard_index_outside_the_component_is_refused() {
    let tmp = TempDir::new("mf-hub-shard");
    let mut files = model_files(&[(
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        shard_index("../../../../../../etc/passwd"),
    )]);
    files.remove("transformer/diffusion_pytorch_model.safetensors");
    let o = fetch_hub(&tmp, &fake_hub(files, Answers::new()), &[]);
    assert_error(&o, 1, &["shard", "damaged or hostile"]);
}

#[test]
fn hub_names_that_would_leave_the_cache_are_refused() {
    let cases = [
        (
            Answer {
                etag: Some("../../../../escaped".into()),
                ..Answer::default()
            },
            "invalid ETag",
        ),
        (
            Answer {
                commit: Some("../../../../escaped".into()),
                ..Answer::default()
            },
            "invalid commit",
        ),
    ];
    for (answer, needle) in cases {
        let tmp = TempDir::new("mf-hub-names");
        let answers = Answers::from([("model_index.json".to_string(), answer)]);
        let o = fetch_hub(&tmp, &fake_hub(model_files(&[]), answers), &[]);
        assert_error(&o, 1, &[needle, "model_index.json", "HF_ENDPOINT"]);
        assert_eq!(tree(tmp.path()), Vec::<String>::new(), "nothing written");
    }
    let tmp = TempDir::new("mf-hub-rev");
    let hub = fake_hub(model_files(&[]), Answers::new());
    let o = fetch_hub(&tmp, &hub, &["--revision", "../../../escaped"]);
    assert_error(&o, 2, &["--revision", "not a branch, tag or commit"]);
    assert_eq!(tree(tmp.path()), Vec::<String>::new(), "nothing written");
}

#[test]
fn hub_short_or_corrupt_transfers_are_not_kept() {
    let weights = "text_encoder/model.safetensors";
    let cases = [
        (
            Answer {
                announced: Some(good_weights().len() + 1000),
                ..Answer::default()
            },
            "incomplete",
        ),
        (
            Answer {
                linked_etag: Some("ab".repeat(32)),
                ..Answer::default()
            },
            "corrupt",
        ),
    ];
    for (answer, needle) in cases {
        let tmp = TempDir::new("mf-hub-short");
        let answers = Answers::from([(weights.to_string(), answer)]);
        let o = fetch_hub(&tmp, &fake_hub(model_files(&[]), answers), &[]);
        assert_error(&o, 1, &[needle, weights, "nothing was kept"]);
        let files = tree(&repo_cache(&tmp));
        assert!(
            !files
                .iter()
                .any(|f| f.contains("text_encoder/model.safetensors") || f.contains("incomplete")),
            "the broken download stayed in the cache: {files:?}"
        );
    }
}

/// `tiny-w0` in `dir/model`, with the transformer's first BF16 tensor relabelled `dtype` (a
/// two-byte integer dtype, so every offset still fits).
fn tiny_with_int_transformer(dir: &Path, dtype: &str) -> PathBuf {
    let tiny = common::model("tiny-w0");
    let model = dir.join("model");
    for entry in [
        "model_index.json",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "vae",
    ] {
        std::fs::create_dir_all(&model).unwrap();
        std::os::unix::fs::symlink(tiny.join(entry), model.join(entry)).unwrap();
    }
    std::fs::create_dir_all(model.join("transformer")).unwrap();
    std::fs::copy(
        tiny.join("transformer/config.json"),
        model.join("transformer/config.json"),
    )
    .unwrap();
    let mut bytes =
        std::fs::read(tiny.join("transformer/diffusion_pytorch_model.safetensors")).unwrap();
    let from = br#""dtype":"BF16""#;
    let at = bytes.windows(from.len()).position(|w| w == from).unwrap();
    // Same length: the JSON allows the padding space.
    let to = format!("\"dtype\":\"{dtype}\" ");
    assert_eq!(to.len(), from.len());
    bytes[at..at + from.len()].copy_from_slice(to.as_bytes());
    std::fs::write(
        model.join("transformer/diffusion_pytorch_model.safetensors"),
        bytes,
    )
    .unwrap();
    model
}

#[test]
fn integer_weights_are_refused_when_a_model_loads() {
    let tmp = TempDir::new("mf-load-int");
    let model = tiny_with_int_transformer(tmp.path(), "I16");
    let o = command_in(
        tmp.path(),
        &[
            "generate",
            "-q",
            "-m",
            model.to_str().unwrap(),
            "-p",
            "x",
            "-W",
            "64",
            "-H",
            "64",
            "--steps",
            "1",
            "-o",
            "out.png",
        ],
    )
    .output()
    .unwrap();
    assert_error(&o, 1, &["transformer", "I16", "not a weight dtype"]);
    assert!(!tmp.join("out.png").exists());
}

#[test]
fn hub_lfs_redirects_are_followed_without_the_token() {
    let tmp = TempDir::new("mf-hub-lfs");
    let weights = "transformer/diffusion_pytorch_model.safetensors";
    let lfs = Answer {
        lfs: true,
        ..Answer::default()
    };
    let answers = Answers::from([(weights.to_string(), lfs)]);
    let (hub, leaked) = fake_hub_seeing_tokens(model_files(&[]), answers);
    let mut cmd = command_in(tmp.path(), &["fetch", "-q", "-m", "org/name"]);
    cmd.env_remove("HF_HUB_OFFLINE")
        .env("HF_ENDPOINT", &hub)
        .env("HF_TOKEN", "hf_secret");
    for proxy in ["http_proxy", "HTTP_PROXY", "ALL_PROXY", "all_proxy"] {
        cmd.env_remove(proxy);
    }
    let o = cmd.output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let got = std::fs::read(
        repo_cache(&tmp)
            .join("snapshots")
            .join(COMMIT)
            .join(weights),
    )
    .unwrap();
    assert_eq!(got, good_weights());
    // The blob is named by its SHA-256, as huggingface_hub names LFS blobs.
    let sha: String = Sha256::digest(&got)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(repo_cache(&tmp).join("blobs").join(sha).is_file());
    assert!(!leaked.load(Ordering::SeqCst), "the token went to the CDN");
}
