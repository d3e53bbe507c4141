//! `flux2-klein serve` end to end on the tiny model, over a raw HTTP/1.1 client: the Images API
//! (generations, edits with references and inpainting) and `/v1/generate` give the CLI's pixels
//! for the same settings; concurrent requests are each answered with their own images; a full
//! queue answers 429 with Retry-After; an API key is enforced on /v1 (and demanded for a
//! non-loopback host); bad requests get 4xx in OpenAI's error shape while the server keeps
//! serving; SIGTERM finishes the running request, answers the queued one 503 and exits 0.
//!
//! Each test starts its own server on `--port 0` (the port is read from the first stdout
//! line), so the tests run in parallel.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::TempDir;
use image::{DynamicImage, RgbImage};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_flux2-klein");

/// How long a server may take to print its port and to load and warm the models (CI is a
/// slow 2-core box running several tests at once).
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Read/write timeout of one HTTP exchange: a hung server fails the test instead of hanging CI.
const IO_TIMEOUT: Duration = Duration::from_secs(300);

const GENERATIONS: &str = "/v1/images/generations";
const EDITS: &str = "/v1/images/edits";

/// The size and steps of the "long" request that must still be running while the test queues
/// others behind it (about 1-3 s on the tiny model on 2 cores; a short one takes ~0.2 s).
const LONG_SIZE: &str = "256x256";
const LONG_STEPS: u32 = 30;

// ---------------------------------------------------------------------------------------------
// The server

/// A running `flux2-klein serve` on the tiny model; killed when dropped, and its stderr printed
/// when the test failed.
struct Server {
    child: Child,
    port: u16,
    log: Arc<Mutex<Vec<u8>>>,
}

impl Server {
    /// Starts `serve -m tiny-w0 --port 0 --steps 2` plus `args` and waits for its
    /// `listening on` line (not for the models).
    fn spawn(args: &[&str]) -> Server {
        let mut child = Command::new(BIN)
            .args(["-q", "serve", "-m"])
            .arg(common::model("tiny-w0"))
            .args(["--port", "0", "--steps", "2"])
            .args(args)
            // A key or model in the environment would change what the tests see.
            .env_remove("FLUX2_KLEIN_API_KEY")
            .env_remove("FLUX2_KLEIN_MODEL")
            .env("HF_HUB_OFFLINE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting flux2-klein serve");
        let log = drain(child.stderr.take().unwrap());
        let first = first_line(child.stdout.take().unwrap());
        // Built before anything can panic, so that Drop kills the child.
        let mut server = Server {
            child,
            port: 0,
            log,
        };
        let line = first
            .recv_timeout(READY_TIMEOUT)
            .unwrap_or_else(|e| panic!("no first line on serve's stdout ({e})"));
        let port = line
            .strip_prefix("listening on http://127.0.0.1:")
            .and_then(|p| p.parse::<u16>().ok())
            .unwrap_or_else(|| {
                panic!("the first stdout line {line:?} is not `listening on http://127.0.0.1:PORT`")
            });
        assert_ne!(port, 0, "--port 0 must print the port the system chose");
        server.port = port;
        server
    }

    /// [`Server::spawn`], then waits until `/health` says ready.
    fn start(args: &[&str]) -> Server {
        let mut server = Self::spawn(args);
        server.wait_ready();
        server
    }

    /// Polls `/health`: 503 `{"status":"loading"}` while the models load, then 200
    /// `{"status":"ok"}`.
    fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            match try_request(self.port, "GET", "/health", &[], None) {
                Ok(r) if r.status == 200 => {
                    assert_eq!(r.json()["status"], "ok", "/health: {}", r.summary());
                    return;
                }
                Ok(r) => {
                    assert_eq!(r.status, 503, "/health while loading: {}", r.summary());
                    assert_eq!(r.json()["status"], "loading", "/health: {}", r.summary());
                }
                Err(e) => match self.child.try_wait().unwrap() {
                    Some(status) => panic!("serve exited ({status}) before it was ready"),
                    // It printed its port after binding: it must accept connections.
                    None => panic!("GET /health: {e}"),
                },
            }
            assert!(
                started.elapsed() < READY_TIMEOUT,
                "serve is not ready after {READY_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything the server wrote on stderr so far.
    fn log(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// `GET /metrics` (no key needed).
    fn metrics(&self) -> String {
        let r = get(self.port, "/metrics", &[]);
        assert_eq!(r.status, 200, "/metrics: {}", r.summary());
        r.text()
    }

    /// The value of the metrics line `NAME VALUE` (`name` with its labels, if any).
    fn metric(&self, name: &str) -> f64 {
        let text = self.metrics();
        metric_of(&text, name).unwrap_or_else(|| panic!("/metrics has no line `{name} N`:\n{text}"))
    }

    /// Polls `name` until it equals `value`; fails as soon as `gave_up()` (the requests it
    /// waits on were answered, so it can no longer happen).
    fn wait_metric(&self, name: &str, value: f64, gave_up: &dyn Fn() -> bool, what: &str) {
        let started = Instant::now();
        loop {
            if self.metric(name) == value {
                return;
            }
            assert!(
                !gave_up(),
                "{what}: {name} never became {value} and the requests it waited on were \
                 already answered (a failed request, or LONG_SIZE/LONG_STEPS too short here)"
            );
            assert!(
                started.elapsed() < READY_TIMEOUT,
                "{what}: {name} is not {value} after {READY_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to `timeout` for the process to exit.
    #[cfg_attr(not(unix), allow(dead_code))]
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if started.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- serve's stderr ---\n{}--- end ---", self.log());
        }
    }
}

/// The child's stderr, read on a thread into a buffer (a full pipe would block the server).
fn drain(mut stderr: ChildStderr) -> Arc<Mutex<Vec<u8>>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match stderr.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => sink
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&buf[..n]),
            }
        }
    });
    log
}

/// The child's first stdout line, read on a thread (so the test can wait with a timeout);
/// the rest is drained so that the server never blocks on a full pipe.
fn first_line(stdout: ChildStdout) -> Receiver<String> {
    let (send, recv) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) > 0 {
            let _ = send.send(line.trim_end().to_string());
        }
        // Dropped: a server that exits without a line disconnects the receiver at once.
        drop(send);
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    recv
}

fn metric_of(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let value = l.strip_prefix(name)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

// ---------------------------------------------------------------------------------------------
// A raw HTTP/1.1 client (no new crates)

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    /// A header's value; names are case-insensitive.
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("the body is not JSON ({e}): {}", self.summary()))
    }

    /// The status and the start of the body, for failure messages.
    fn summary(&self) -> String {
        let text = self.text();
        let cut: String = text.chars().take(600).collect();
        format!("HTTP {} {cut}", self.status)
    }
}

/// One request on a fresh connection (`Connection: close`), read to EOF. The request is
/// written on a thread while this one reads: a server that answers before it has read the
/// whole body (413) and closes must neither block the test on the write nor lose its answer,
/// so a write error counts only when no complete response arrived.
fn try_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, &[u8])>,
) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some((content_type, bytes)) = body {
        head.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
            bytes.len()
        ));
    }
    head.push_str("\r\n");
    let mut message = head.into_bytes();
    if let Some((_, bytes)) = body {
        message.extend_from_slice(bytes);
    }
    let mut writer = stream.try_clone()?;
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        writer.write_all(&message)?;
        writer.flush()
    });
    let mut raw = Vec::new();
    // On an error (a reset after the answer) the bytes read before it stay in `raw`.
    let read = stream.read_to_end(&mut raw);
    let sent = sender.join().expect("the request writer panicked");
    if let Some(response) = parse_response(&raw) {
        return Ok(response);
    }
    Err(read.err().or(sent.err()).unwrap_or_else(|| {
        let start: String = String::from_utf8_lossy(&raw).chars().take(400).collect();
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("incomplete HTTP response ({} bytes): {start:?}", raw.len()),
        )
    }))
}

/// A complete response (status line, headers, a body of Content-Length bytes, chunked, or to
/// EOF), or `None`.
fn parse_response(raw: &[u8]) -> Option<Response> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let mut response = Response {
        status,
        headers,
        body: Vec::new(),
    };
    let rest = &raw[end + 4..];
    let body = if response
        .header("transfer-encoding")
        .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"))
    {
        dechunk(rest)?
    } else if let Some(len) = response.header("content-length") {
        let len: usize = len.parse().ok()?;
        rest.get(..len)?.to_vec()
    } else {
        rest.to_vec()
    };
    response.body = body;
    Some(response)
}

fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, &[u8])>,
) -> Response {
    try_request(port, method, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> Response {
    request(port, "GET", path, headers, None)
}

fn post_json(port: u16, path: &str, body: &str, headers: &[(&str, &str)]) -> Response {
    request(
        port,
        "POST",
        path,
        headers,
        Some(("application/json", body.as_bytes())),
    )
}

/// A form field: text (name, value) or a file (name, file name, bytes).
enum Part<'a> {
    Text(&'a str, &'a str),
    File(&'a str, &'a str, &'a [u8]),
}

fn post_multipart(port: u16, path: &str, parts: &[Part], headers: &[(&str, &str)]) -> Response {
    const BOUNDARY: &str = "flux2-klein-test-boundary-5f1c9a7e";
    let mut body = Vec::new();
    for part in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        match part {
            Part::Text(name, value) => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                    .as_bytes(),
            ),
            Part::File(name, file, bytes) => {
                body.extend_from_slice(
                    format!(
                        "Content-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\n\
                         Content-Type: application/octet-stream\r\n\r\n"
                    )
                    .as_bytes(),
                );
                body.extend_from_slice(bytes);
                body.extend_from_slice(b"\r\n");
            }
        }
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    let content_type = format!("multipart/form-data; boundary={BOUNDARY}");
    request(
        port,
        "POST",
        path,
        headers,
        Some((content_type.as_str(), body.as_slice())),
    )
}

/// Asserts a 200 JSON answer and returns its body.
fn ok_json(r: &Response) -> Value {
    assert_eq!(r.status, 200, "{}", r.summary());
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "content-type {:?}",
        r.header("content-type")
    );
    r.json()
}

/// Asserts an error answer: `status`, and a JSON body `{"error": {"message", "type", "param",
/// "code"}}` with a non-empty message and type (and `param` when given). Returns the error
/// object.
fn assert_error(r: &Response, status: u16, param: Option<&str>, what: &str) -> Value {
    assert_eq!(r.status, status, "{what}: {}", r.summary());
    let v: Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("{what}: the error body is not JSON ({e}): {}", r.summary()));
    let e = &v["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.trim().is_empty()),
        "{what}: no error.message in {v}"
    );
    assert!(
        e["type"].as_str().is_some_and(|t| !t.is_empty()),
        "{what}: no error.type in {v}"
    );
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{what}: error.param in {v}");
    }
    e.clone()
}

// ---------------------------------------------------------------------------------------------
// Images

fn rgb(bytes: &[u8]) -> RgbImage {
    image::load_from_memory(bytes)
        .expect("a decodable image")
        .to_rgb8()
}

fn b64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("valid base64")
}

/// The images of an Images API answer (`data[k].b64_json`), in order, with their seeds.
fn images_of(v: &Value) -> Vec<(u64, RgbImage)> {
    v["data"]
        .as_array()
        .unwrap_or_else(|| panic!("no data array in {v}"))
        .iter()
        .map(|item| {
            let seed = item["seed"]
                .as_u64()
                .unwrap_or_else(|| panic!("no seed: {item}"));
            let data = item["b64_json"]
                .as_str()
                .unwrap_or_else(|| panic!("no b64_json in the answer (seed {seed})"));
            (seed, rgb(&b64(data)))
        })
        .collect()
}

/// Asserts two images are byte-identical (the message says how far apart they are).
fn assert_same(a: &RgbImage, b: &RgbImage, what: &str) {
    assert_eq!(a.dimensions(), b.dimensions(), "{what}: sizes differ");
    if a.as_raw() != b.as_raw() {
        let pairs = a.as_raw().iter().zip(b.as_raw());
        let differing = pairs.clone().filter(|(x, y)| x != y).count();
        let max = pairs.map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0);
        panic!(
            "{what}: {differing} of {} bytes differ (max {max})",
            a.as_raw().len()
        );
    }
}

fn png(image: DynamicImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A deterministic `w`×`h` RGB gradient PNG; `phase` makes different images of one size.
fn gradient_png(w: u32, h: u32, phase: u32) -> Vec<u8> {
    let image = RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 255 / (w - 1)) as u8,
            (y * 255 / (h - 1)) as u8,
            ((x + 2 * y + phase) * 5 % 256) as u8,
        ])
    });
    png(DynamicImage::ImageRgb8(image))
}

/// A 64×64 grayscale mask without alpha: a white (repaint) square in black.
fn mask_png() -> Vec<u8> {
    let mask = image::GrayImage::from_fn(64, 64, |x, y| {
        let inside = (16..48).contains(&x) && (16..48).contains(&y);
        image::Luma([if inside { 255 } else { 0 }])
    });
    png(DynamicImage::ImageLuma8(mask))
}

/// [`mask_png`]'s square the OpenAI way: RGBA, transparent (alpha 0) where to repaint,
/// opaque elsewhere, and colours that must not matter.
fn alpha_mask_png() -> Vec<u8> {
    let mask = image::RgbaImage::from_fn(64, 64, |x, y| {
        let inside = (16..48).contains(&x) && (16..48).contains(&y);
        image::Rgba([
            (x * 4) as u8,
            200,
            (y * 4) as u8,
            if inside { 0 } else { 255 },
        ])
    });
    png(DynamicImage::ImageRgba8(mask))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// Requests and the CLI

/// A short generation (64×64, 2 steps) with `seed`.
fn small(seed: u64) -> String {
    json!({"prompt": "a red fox", "size": "64x64", "steps": 2, "seed": seed}).to_string()
}

/// A generation long enough to still run while the test queues others behind it.
fn long(seed: u64) -> String {
    json!({
        "prompt": "a lighthouse at dusk",
        "size": LONG_SIZE,
        "steps": LONG_STEPS,
        "seed": seed
    })
    .to_string()
}

/// Runs `flux2-klein -q generate -m tiny-w0 ARGS -o DIR/{seed}.png` and returns the bytes of
/// the file of each of `seeds`.
fn cli(name: &str, args: &[&str], seeds: &[u64]) -> Vec<Vec<u8>> {
    let dir = TempDir::new(name);
    let o = Command::new(BIN)
        .args(["-q", "generate", "-m"])
        .arg(common::model("tiny-w0"))
        .args(args)
        .arg("-o")
        .arg(dir.join("{seed}.png"))
        .env_remove("FLUX2_KLEIN_MODEL")
        .env("HF_HUB_OFFLINE", "1")
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("running flux2-klein generate");
    assert!(
        o.status.success(),
        "generate {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    seeds
        .iter()
        .map(|s| {
            let path = dir.join(format!("{s}.png"));
            std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn generations_equal_the_cli() {
    let server = Server::start(&[]);
    let body = json!({"prompt": "a red fox", "size": "64x64", "steps": 2, "seed": 7, "n": 2});
    let v = ok_json(&post_json(server.port, GENERATIONS, &body.to_string(), &[]));
    assert_eq!(v["size"], "64x64", "{v}");
    assert_eq!(v["output_format"], "png", "{v}");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let created = v["created"].as_u64().expect("created: unix seconds");
    assert!(created.abs_diff(now) < 600, "created {created}, now {now}");
    let served = images_of(&v);
    let seeds: Vec<u64> = served.iter().map(|(seed, _)| *seed).collect();
    assert_eq!(seeds, [7, 8], "image k of n has seed S+k");

    let args = [
        "-p",
        "a red fox",
        "-W",
        "64",
        "-H",
        "64",
        "--steps",
        "2",
        "--seed",
        "7",
        "-n",
        "2",
    ];
    let files = cli("serve-generations-cli", &args, &[7, 8]);
    for ((seed, image), file) in served.iter().zip(&files) {
        assert_eq!(image.dimensions(), (64, 64));
        assert_same(
            image,
            &rgb(file),
            &format!("seed {seed}: server vs CLI -n 2"),
        );
    }
    // Otherwise equal pixels would prove little.
    assert!(
        served[0].1 != served[1].1,
        "seeds 7 and 8 gave the same image"
    );

    // response_format "url": a data URL of the same PNG (the server keeps no files to link).
    let body = json!({
        "prompt": "a red fox", "size": "64x64", "steps": 2, "seed": 8, "response_format": "url"
    });
    let v = ok_json(&post_json(server.port, GENERATIONS, &body.to_string(), &[]));
    let item = &v["data"][0];
    assert_eq!(item["seed"], 8, "{item}");
    assert!(
        item.get("b64_json").is_none(),
        "url answers carry no b64_json"
    );
    let url = item["url"].as_str().expect("data[0].url");
    let data = url
        .strip_prefix("data:image/png;base64,")
        .unwrap_or_else(|| panic!("not a PNG data URL: {}", &url[..url.len().min(60)]));
    assert_same(&rgb(&b64(data)), &served[1].1, "the data URL's image");

    let v = ok_json(&get(server.port, "/v1/models", &[]));
    let models = v["data"].as_array().expect("data: the models");
    assert_eq!(models.len(), 1, "one model: {v}");
    assert_eq!(models[0]["object"], "model", "{v}");
    assert!(
        models[0]["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{v}"
    );
}

#[test]
fn edits_equal_the_cli() {
    let server = Server::start(&[]);
    let inputs = TempDir::new("serve-edits-inputs");
    // 96×80 (multiples of 16): the output takes the first reference's size.
    let (a, b) = (gradient_png(96, 80, 0), gradient_png(64, 64, 50));
    let (a_path, b_path) = (inputs.join("a.png"), inputs.join("b.png"));
    std::fs::write(&a_path, &a).unwrap();
    std::fs::write(&b_path, &b).unwrap();
    let r = post_multipart(
        server.port,
        EDITS,
        &[
            Part::Text("prompt", "a red fox"),
            Part::Text("steps", "2"),
            Part::Text("seed", "5"),
            Part::File("image[]", "a.png", &a),
            Part::File("image[]", "b.png", &b),
        ],
        &[],
    );
    let v = ok_json(&r);
    assert_eq!(v["size"], "96x80", "{v}");
    let served = images_of(&v);
    assert_eq!(served.len(), 1);
    assert_eq!(served[0].0, 5);
    let args = [
        "-p",
        "a red fox",
        "--ref",
        s(&a_path),
        "--ref",
        s(&b_path),
        "--steps",
        "2",
        "--seed",
        "5",
    ];
    let files = cli("serve-edits-cli", &args, &[5]);
    assert_same(
        &served[0].1,
        &rgb(&files[0]),
        "two references: server vs CLI --ref a --ref b",
    );

    // Inpainting: image = the init image, mask without alpha = the CLI's --mask.
    let (init, mask) = (gradient_png(64, 64, 100), mask_png());
    let (init_path, mask_path) = (inputs.join("init.png"), inputs.join("mask.png"));
    std::fs::write(&init_path, &init).unwrap();
    std::fs::write(&mask_path, &mask).unwrap();
    // The same edit with a given mask.
    let inpaint = |mask: &[u8]| {
        let r = post_multipart(
            server.port,
            EDITS,
            &[
                Part::Text("prompt", "a red fox"),
                Part::Text("steps", "2"),
                Part::Text("seed", "5"),
                Part::Text("strength", "0.8"),
                Part::File("image", "init.png", &init),
                Part::File("mask", "mask.png", mask),
            ],
            &[],
        );
        ok_json(&r)
    };
    let v = inpaint(&mask);
    assert_eq!(v["size"], "64x64", "the init image's size: {v}");
    let inpainted = images_of(&v);
    assert_eq!(inpainted.len(), 1);
    assert_eq!(inpainted[0].0, 5);
    let args = [
        "-p",
        "a red fox",
        "--init-image",
        s(&init_path),
        "--mask",
        s(&mask_path),
        "--strength",
        "0.8",
        "--steps",
        "2",
        "--seed",
        "5",
    ];
    let files = cli("serve-inpaint-cli", &args, &[5]);
    assert_same(
        &inpainted[0].1,
        &rgb(&files[0]),
        "inpainting: server vs CLI --init-image --mask --strength 0.8",
    );

    // OpenAI's mask convention: an alpha channel, transparent where to repaint. The same
    // square as the CLI's white one gives the same image.
    let openai = images_of(&inpaint(&alpha_mask_png()));
    assert_same(
        &openai[0].1,
        &inpainted[0].1,
        "an alpha mask (transparent = repaint) vs the same square in white",
    );
}

#[test]
fn sixteen_concurrent_requests_are_all_answered() {
    let server = Server::start(&[]);
    let port = server.port;
    // Seeds 100..108, each sent twice: requests of one seed must get equal pixels whichever
    // batches they land in, and each answer its own seed.
    let seeds: Vec<u64> = (0..16).map(|i| 100 + i % 8).collect();
    let answers: Vec<Response> = std::thread::scope(|scope| {
        let threads: Vec<_> = seeds
            .iter()
            .map(|&seed| scope.spawn(move || post_json(port, GENERATIONS, &small(seed), &[])))
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let mut by_seed: Vec<Option<RgbImage>> = vec![None; 8];
    for (i, (r, &seed)) in answers.iter().zip(&seeds).enumerate() {
        let images = images_of(&ok_json(r));
        assert_eq!(images.len(), 1, "request {i}: one image");
        let (got, image) = &images[0];
        assert_eq!(*got, seed, "request {i} answered another request's image");
        assert_eq!(image.dimensions(), (64, 64));
        let k = (seed - 100) as usize;
        match &by_seed[k] {
            Some(first) => assert_same(image, first, &format!("the two requests of seed {seed}")),
            None => by_seed[k] = Some(image.clone()),
        }
    }
    let distinct: Vec<RgbImage> = by_seed.into_iter().map(Option::unwrap).collect();
    for (i, x) in distinct.iter().enumerate() {
        for (j, y) in distinct.iter().enumerate().skip(i + 1) {
            assert!(
                x != y,
                "seeds {} and {} gave the same image",
                100 + i,
                100 + j
            );
        }
    }
    let text = server.metrics();
    let images_total = metric_of(&text, "flux2_klein_images_total").expect("images_total");
    assert!(images_total >= 16.0, "images_total {images_total}:\n{text}");
    let count = metric_of(&text, "flux2_klein_request_duration_seconds_count").expect("_count");
    assert!(count >= 16.0, "request_duration_seconds_count {count}");
    let inf = metric_of(
        &text,
        "flux2_klein_request_duration_seconds_bucket{le=\"+Inf\"}",
    )
    .expect("the +Inf bucket");
    assert_eq!(inf, count, "the +Inf bucket counts every request");
    assert!(metric_of(&text, "flux2_klein_request_duration_seconds_sum").is_some());
    assert_eq!(metric_of(&text, "flux2_klein_queue_depth"), Some(0.0));
    assert_eq!(metric_of(&text, "flux2_klein_ready"), Some(1.0));
    for kind in [
        "bad_request",
        "unauthorized",
        "too_large",
        "queue_full",
        "shutting_down",
        "server_error",
        "client_gone",
    ] {
        let name = format!("flux2_klein_errors_total{{kind=\"{kind}\"}}");
        assert!(
            metric_of(&text, &name).is_some(),
            "every error kind's line is always present: {name} missing"
        );
    }

    // Alone, seed 103 gives what it gave inside a batch.
    let alone = images_of(&ok_json(&post_json(port, GENERATIONS, &small(103), &[])));
    assert_same(&alone[0].1, &distinct[3], "seed 103 alone vs in a batch");
}

#[test]
fn a_full_queue_gets_429() {
    let server = Server::start(&["--max-queue", "1"]);
    let port = server.port;
    let a = std::thread::spawn(move || post_json(port, GENERATIONS, &long(1), &[]));
    server.wait_metric(
        "flux2_klein_requests_running",
        1.0,
        &|| a.is_finished(),
        "the long request A running",
    );
    let b = std::thread::spawn(move || post_json(port, GENERATIONS, &small(2), &[]));
    server.wait_metric(
        "flux2_klein_queue_depth",
        1.0,
        &|| a.is_finished() || b.is_finished(),
        "request B waiting behind A",
    );
    // One waits (--max-queue 1): C is refused at once.
    let c = post_json(port, GENERATIONS, &small(3), &[]);
    assert_error(&c, 429, None, "C, with the queue full");
    let retry = c
        .header("retry-after")
        .unwrap_or_else(|| panic!("429 without Retry-After: {:?}", c.headers));
    let retry: u64 = retry
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After {retry:?} is not whole seconds"));
    assert!(retry >= 1, "Retry-After {retry}");

    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    let a = images_of(&ok_json(&a));
    assert_eq!((a.len(), a[0].0), (1, 1));
    assert_eq!(a[0].1.dimensions(), (256, 256));
    let b = images_of(&ok_json(&b));
    assert_eq!((b.len(), b[0].0), (1, 2));
    assert_eq!(b[0].1.dimensions(), (64, 64));
    assert_eq!(
        server.metric("flux2_klein_errors_total{kind=\"queue_full\"}"),
        1.0
    );
    assert_eq!(server.metric("flux2_klein_queue_depth"), 0.0);
}

#[test]
fn api_key_is_required_when_set() {
    let server = Server::start(&["--api-key", "sekret"]);
    let port = server.port;
    let body = small(11);
    let refused = [
        ("no Authorization header", None),
        ("a wrong key", Some("Bearer wrong")),
        ("another scheme", Some("Basic sekret")),
    ];
    for (what, header) in refused {
        let headers: Vec<(&str, &str)> = header.map(|h| ("Authorization", h)).into_iter().collect();
        let r = post_json(port, GENERATIONS, &body, &headers);
        let e = assert_error(&r, 401, None, what);
        assert_eq!(e["code"], "invalid_api_key", "{what}: {e}");
    }
    let r = get(port, "/v1/models", &[]);
    assert_error(&r, 401, None, "/v1/models without a key");

    let key = [("Authorization", "Bearer sekret")];
    let images = images_of(&ok_json(&post_json(port, GENERATIONS, &body, &key)));
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].0, 11);
    ok_json(&get(port, "/v1/models", &key));
    // The probes need no key.
    let health = get(port, "/health", &[]);
    assert_eq!(health.status, 200, "{}", health.summary());
    let metrics = get(port, "/metrics", &[]);
    assert_eq!(metrics.status, 200, "{}", metrics.summary());
    assert!(
        metrics
            .header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "Prometheus text: {:?}",
        metrics.header("content-type")
    );
    assert_eq!(metric_of(&metrics.text(), "flux2_klein_ready"), Some(1.0));
    assert_eq!(
        server.metric("flux2_klein_errors_total{kind=\"unauthorized\"}"),
        4.0
    );
    drop(server);

    // Without --api-key no header is needed (the other tests rely on it; /v1/models answers
    // before the models are warm).
    let open = Server::spawn(&[]);
    ok_json(&get(open.port, "/v1/models", &[]));
    drop(open);

    // A non-loopback host without a key is refused before binding or loading anything.
    let dir = TempDir::new("serve-open-host");
    let mut child = Command::new(BIN)
        .args(["-q", "serve", "-m"])
        .arg(common::model("tiny-w0"))
        .args(["--host", "0.0.0.0", "--port", "0"])
        .env_remove("FLUX2_KLEIN_API_KEY")
        .env_remove("FLUX2_KLEIN_MODEL")
        .env("HF_HUB_OFFLINE", "1")
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting flux2-klein serve");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve --host 0.0.0.0 without a key still runs after 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (mut stdout, mut stderr) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        matches!(status.code(), Some(1 | 2)),
        "exit status {status}; stderr:\n{stderr}"
    );
    assert!(stderr.contains("--api-key"), "{stderr}");
    assert!(
        !stdout.contains("listening on"),
        "it must refuse before it listens: {stdout}"
    );
}

#[test]
fn bad_requests_get_4xx_and_the_server_keeps_serving() {
    let server = Server::start(&["--max-body-mib", "1"]);
    let port = server.port;
    // (body, the field blamed, if one must be)
    let bad: [(&str, Option<&str>); 8] = [
        (r#"{"prompt": "a fox", "#, None),
        (r#"{"prompt":"x","bogus":1}"#, Some("bogus")),
        (r#"{"size":"64x64"}"#, Some("prompt")),
        (r#"{"prompt":"x","size":"63x"}"#, Some("size")),
        (r#"{"prompt":"x","size":"100000x100000"}"#, Some("size")),
        (r#"{"prompt":"x","size":"64x64","n":0}"#, Some("n")),
        (r#"{"prompt":"x","size":"64x64","n":17}"#, Some("n")),
        (r#"["not", "an", "object"]"#, None),
    ];
    for (body, param) in bad {
        let r = post_json(port, GENERATIONS, body, &[]);
        assert_error(&r, 400, param, body);
    }
    let mut bad_requests = bad.len();

    // 2 MiB against --max-body-mib 1 (the server may answer before reading it all).
    let big = format!(r#"{{"prompt":"{}"}}"#, "a".repeat(2 << 20));
    let r = post_json(port, GENERATIONS, &big, &[]);
    assert_error(&r, 413, None, "a 2 MiB body");

    let r = post_multipart(
        port,
        EDITS,
        &[
            Part::Text("prompt", "x"),
            Part::File("image", "notes.txt", b"this is not an image"),
        ],
        &[],
    );
    assert_error(&r, 400, Some("image"), "an edit of a text file");
    bad_requests += 1;

    // The server reads no files a request names.
    let r = post_json(
        port,
        "/v1/generate",
        r#"{"prompt":"x","ref":["/etc/passwd"]}"#,
        &[],
    );
    assert_error(&r, 400, Some("ref"), "/v1/generate naming a file");
    bad_requests += 1;

    let r = get(port, "/v1/no-such-route", &[]);
    assert_error(&r, 404, None, "an unknown route");

    // Still serving.
    let images = images_of(&ok_json(&post_json(port, GENERATIONS, &small(21), &[])));
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].0, 21);
    assert_eq!(
        server.metric("flux2_klein_errors_total{kind=\"bad_request\"}"),
        bad_requests as f64
    );
    assert_eq!(
        server.metric("flux2_klein_errors_total{kind=\"too_large\"}"),
        1.0
    );
}

#[cfg(unix)]
#[test]
fn sigterm_finishes_the_running_request_and_exits_0() {
    let mut server = Server::start(&[]);
    let port = server.port;
    let a = std::thread::spawn(move || post_json(port, GENERATIONS, &long(1), &[]));
    server.wait_metric(
        "flux2_klein_requests_running",
        1.0,
        &|| a.is_finished(),
        "the long request A running",
    );
    let b = std::thread::spawn(move || post_json(port, GENERATIONS, &small(2), &[]));
    server.wait_metric(
        "flux2_klein_queue_depth",
        1.0,
        &|| a.is_finished() || b.is_finished(),
        "request B waiting behind A",
    );
    let pid = server.child.id().to_string();
    let kill = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("running kill");
    assert!(kill.success(), "kill -TERM {pid}: {kill}");
    let signalled = Instant::now();

    // B had not started: 503. A was running: it finishes.
    let b = b.join().unwrap();
    assert_error(&b, 503, None, "the queued request at shutdown");
    let a = a.join().unwrap();
    let images = images_of(&ok_json(&a));
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].0, 1);
    assert_eq!(images[0].1.dimensions(), (256, 256));

    let left = Duration::from_secs(60).saturating_sub(signalled.elapsed());
    let status = server
        .wait_exit(left)
        .expect("serve still runs 60 s after SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

#[test]
fn generate_route_returns_png_with_metadata() {
    let server = Server::start(&[]);
    let line = r#"{"prompt":"a fox","seed":3,"width":64,"height":64,"steps":2}"#;
    let r = post_json(server.port, "/v1/generate", line, &[]);
    assert_eq!(r.status, 200, "{}", r.summary());
    assert_eq!(r.header("content-type"), Some("image/png"));
    assert!(r.body.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(
        [b"tEXt", b"iTXt", b"zTXt"]
            .iter()
            .any(|chunk| contains(&r.body, *chunk)),
        "the PNG has no text chunks"
    );
    let chunks = flux2_klein::image_io::png_text_chunks(&r.body).unwrap();
    assert_eq!(
        common::text_chunk(&chunks, "prompt"),
        Some("a fox"),
        "{chunks:?}"
    );
    assert_eq!(common::text_chunk(&chunks, "seed"), Some("3"), "{chunks:?}");

    let args = [
        "-p", "a fox", "--seed", "3", "-W", "64", "-H", "64", "--steps", "2",
    ];
    let files = cli("serve-generate-route-cli", &args, &[3]);
    let served = rgb(&r.body);
    assert_same(&served, &rgb(&files[0]), "/v1/generate vs the CLI");
    // The metadata the CLI records for the same settings.
    let cli_chunks = flux2_klein::image_io::png_text_chunks(&files[0]).unwrap();
    for k in ["prompt", "seed", "steps", "size"] {
        assert_eq!(
            common::text_chunk(&chunks, k),
            common::text_chunk(&cli_chunks, k),
            "metadata {k}: server {chunks:?}, CLI {cli_chunks:?}"
        );
    }

    // Accept: application/json: the generations route's JSON.
    let r = post_json(
        server.port,
        "/v1/generate",
        line,
        &[("Accept", "application/json")],
    );
    let v = ok_json(&r);
    let images = images_of(&v);
    assert_eq!(images.len(), 1, "{v}");
    assert_eq!(images[0].0, 3);
    assert_same(&images[0].1, &served, "the JSON answer's image");
}
