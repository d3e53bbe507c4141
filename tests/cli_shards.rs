//! `generate --shard K/N`, `--skip-existing` and streamed `--prompt-file -` on the tiny model:
//! the shards of a run together make exactly its files (names and pixels), a re-run with
//! `--skip-existing` makes only the missing ones, and a streamed line's image is written
//! (and its path printed) before the next line is sent.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::TempDir;

const PROMPTS: &str = "a red fox\n# a comment\na lighthouse at dusk\nthree cats\n\na boat\nsnow\n";

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_flux2-klein"))
}

/// `generate` on the tiny model at 64×64, 2 steps, plus `args`.
fn generate(args: &[&str]) -> Command {
    let mut cmd = bin();
    cmd.args(["generate", "-m"])
        .arg(common::model("tiny-w0"))
        .args(["-W", "64", "-H", "64", "--steps", "2"])
        .args(args);
    cmd
}

fn run(cmd: &mut Command) -> std::process::Output {
    cmd.stdin(Stdio::null())
        .output()
        .expect("running flux2-klein")
}

fn succeed(cmd: &mut Command) -> std::process::Output {
    let o = run(cmd);
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Every file of `dir`, by name, decoded to RGB.
fn images(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let image = image::open(e.path()).unwrap().to_rgb8().into_raw();
            (e.file_name().to_string_lossy().into_owned(), image)
        })
        .collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn shards_together_make_the_whole_run() {
    // 5 prompts × -n 2 = 10 images: `{index}` is zero-padded to 2 digits in every shard.
    let dir = TempDir::new("shards");
    let prompts = dir.join("p.txt");
    std::fs::write(&prompts, PROMPTS).unwrap();
    let (all, parts) = (dir.join("all"), dir.join("parts"));
    let base = ["--prompt-file", s(&prompts), "--seed", "1", "-n", "2", "-o"];
    let template = |d: &Path| d.join("{index}.png").display().to_string();
    succeed(generate(&base).arg(template(&all)));
    let mut shard_files = Vec::new();
    for k in 1..=3 {
        let shard = format!("{k}/3");
        let o = succeed(
            generate(&base)
                .arg(template(&parts))
                .args(["--shard", &shard]),
        );
        let printed: Vec<String> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| Path::new(l).file_name().unwrap().to_string_lossy().into())
            .collect();
        shard_files.push(printed);
        let stderr = String::from_utf8_lossy(&o.stderr);
        let count = [4, 4, 2][k - 1];
        assert!(
            stderr.contains(&format!("shard {shard}: {count} of 10 images")),
            "{stderr}"
        );
    }
    // Jobs 1 and 4 (images 1, 2, 7, 8), 2 and 5, 3.
    assert_eq!(
        shard_files,
        [
            vec!["01.png", "02.png", "07.png", "08.png"],
            vec!["03.png", "04.png", "09.png", "10.png"],
            vec!["05.png", "06.png"],
        ]
    );
    let (whole, union) = (images(&all), images(&parts));
    assert_eq!(whole.len(), 10);
    assert_eq!(
        whole.keys().collect::<Vec<_>>(),
        union.keys().collect::<Vec<_>>()
    );
    for (name, pixels) in &whole {
        assert!(union[name] == *pixels, "{name}: the shard's pixels differ");
    }
    // Images of one prompt differ (seeds 1 and 2), so equal files are not trivially equal.
    assert_ne!(whole["01.png"], whole["02.png"]);

    // --skip-existing after two files are lost makes exactly those two.
    let before: BTreeMap<String, (std::time::SystemTime, u64, Vec<u8>)> = whole
        .keys()
        .map(|n| {
            use std::os::unix::fs::MetadataExt;
            let path = all.join(n);
            let meta = std::fs::metadata(&path).unwrap();
            (
                n.clone(),
                (
                    meta.modified().unwrap(),
                    meta.ino(),
                    std::fs::read(&path).unwrap(),
                ),
            )
        })
        .collect();
    std::fs::remove_file(all.join("03.png")).unwrap();
    std::fs::remove_file(all.join("10.png")).unwrap();
    let o = succeed(generate(&base).arg(template(&all)).arg("--skip-existing"));
    let printed: Vec<PathBuf> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(PathBuf::from)
        .collect();
    assert_eq!(printed, [all.join("03.png"), all.join("10.png")]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("skipped 8 existing images"), "{stderr}");
    for (name, (mtime, ino, bytes)) in &before {
        use std::os::unix::fs::MetadataExt;
        let path = all.join(name);
        if name == "03.png" || name == "10.png" {
            assert_eq!(images(&all)[name], whole[name], "{name} made again");
            continue;
        }
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.modified().unwrap(), *mtime, "{name} was rewritten");
        assert_eq!(meta.ino(), *ino, "{name} was replaced");
        assert_eq!(std::fs::read(&path).unwrap(), *bytes, "{name}");
    }
    // Everything there: nothing to do, nothing loaded (a missing model would fail).
    let o = succeed(
        bin()
            .args(["generate", "-m", "./no-such-model", "--prompt-file"])
            .arg(&prompts)
            .args(["--seed", "1", "-n", "2", "--skip-existing", "-o"])
            .arg(template(&all)),
    );
    assert!(o.stdout.is_empty());
    assert!(String::from_utf8_lossy(&o.stderr).contains("skipped 10 existing images"));
}

#[test]
fn skip_existing_refuses_random_seeds() {
    let dir = TempDir::new("skip-random");
    let prompts = dir.join("p.txt");
    std::fs::write(&prompts, "{\"prompt\": \"x\", \"seed\": 3}\nno seed here\n").unwrap();
    for args in [
        vec!["-p", "x", "--skip-existing"],
        vec!["-p", "x", "--skip-existing", "--seed", "-1"],
        vec!["--prompt-file", s(&prompts), "--skip-existing"],
    ] {
        let o = run(bin()
            .args(["generate", "-m", "./no-such-model"])
            .args(&args)
            .current_dir(dir.path()));
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("--skip-existing needs fixed seeds: pass --seed N"),
            "{stderr}"
        );
    }
    assert_eq!(dir.entries(), ["p.txt"]);
}

#[test]
fn bad_shards_are_usage_errors() {
    for bad in ["0/3", "4/3", "a/b", "3", "1/0", "2/"] {
        let o = run(bin().args(["generate", "-p", "x", "--shard", bad]));
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{bad}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains("--shard") && stderr.contains("K/N"),
            "{stderr}"
        );
    }
}

/// Reads lines of the child's stdout on a thread, so a test can wait for one with a timeout.
fn lines_of(stdout: std::process::ChildStdout) -> std::sync::mpsc::Receiver<String> {
    let (send, recv) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if send.send(line).is_err() {
                return;
            }
        }
    });
    recv
}

#[test]
fn streamed_prompts_are_made_as_they_arrive() {
    let dir = TempDir::new("stream");
    let out = dir.join("s");
    let mut child = generate(&["--prompt-file", "-", "--seed", "5", "-o"])
        .arg(out.join("{index}-{seed}.png"))
        .arg("-q")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let lines = lines_of(child.stdout.take().unwrap());
    let wait = Duration::from_secs(120);
    stdin.write_all("\u{feff}a red fox\n".as_bytes()).unwrap();
    stdin.flush().unwrap();
    let first = lines
        .recv_timeout(wait)
        .expect("the first path, while stdin is open");
    assert_eq!(PathBuf::from(&first), out.join("1-5.png"));
    assert!(Path::new(&first).is_file());
    stdin
        .write_all(b"# a comment\n{\"prompt\": \"a lighthouse at dusk\", \"seed\": 9}\n")
        .unwrap();
    stdin.flush().unwrap();
    let second = lines.recv_timeout(wait).expect("the second path");
    assert_eq!(PathBuf::from(&second), out.join("2-9.png"));
    drop(stdin);
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{stderr}");
    assert!(lines.recv_timeout(wait).is_err(), "two images only");

    // The same prompts and seeds from a file: the same pixels.
    let prompts = dir.join("p.txt");
    std::fs::write(
        &prompts,
        "a red fox\n{\"prompt\": \"a lighthouse at dusk\", \"seed\": 9}\n",
    )
    .unwrap();
    let file = dir.join("f");
    succeed(
        generate(&["-q", "--prompt-file", s(&prompts), "--seed", "5", "-o"])
            .arg(file.join("{index}-{seed}.png")),
    );
    let (streamed, from_file) = (images(&out), images(&file));
    assert_eq!(
        streamed.keys().collect::<Vec<_>>(),
        ["1-5.png", "2-9.png"],
        "unpadded {{index}}"
    );
    assert_eq!(from_file.keys().collect::<Vec<_>>(), ["1-5.png", "2-9.png"]);
    for name in ["1-5.png", "2-9.png"] {
        assert!(
            streamed[name] == from_file[name],
            "{name}: streamed vs file"
        );
    }

    // A bad line stops the run after the images before it; a stream of comments has no
    // prompts; shards and --skip-existing count the lines read.
    let stream = |input: &str, args: &[&str]| {
        let o = common::output_with_stdin(
            generate(args)
                .args(["--prompt-file", "-", "--seed", "5", "-o"])
                .arg(out.join("{index}-{seed}.png")),
            input.as_bytes(),
        );
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = stream("x\n{\"prompt\": 3}\n", &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("error: stdin line 2:"), "{stderr}");
    assert_eq!(stdout.lines().count(), 1, "line 1's image: {stdout}");
    let (code, _, stderr) = stream("# nothing\n\n", &[]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("has no prompts"), "{stderr}");
    // Lines 1 and 2 exist (1-5.png and 2-9.png's name for seed 5 is 2-5.png): shard 2/2 runs
    // line 2 (new) and line 4; --skip-existing skips nothing there.
    let (code, stdout, stderr) = stream("a\nb\nc\nd\n", &["--shard", "2/2", "--skip-existing"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        stdout.lines().map(PathBuf::from).collect::<Vec<_>>(),
        [out.join("2-5.png"), out.join("4-5.png")]
    );
    assert!(stderr.contains("shard 2/2: 2 of 4 images"), "{stderr}");
    let (code, stdout, stderr) = stream("a\nb\nc\nd\n", &["--shard", "2/2", "--skip-existing"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("skipped 2 existing images"), "{stderr}");
}
