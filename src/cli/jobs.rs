//! What a `generate` run makes: its jobs (the `--prompt`, the lines of a `--prompt-file`, or
//! the settings recorded in a PNG) and their expansion into images (jobs × `--count`, each
//! image with its seed and output template).
//!
//! The prompt-file format: one job per line, trailing whitespace (and `\r`) trimmed, blank
//! lines and `#` comments skipped. A line starting with `{` is a JSON object with `prompt` and
//! optional `negative_prompt`, `seed`, `width`, `height`, `steps`, `guidance`, `ref` (array of
//! paths), `init_image`, `mask`, `strength`, `padding_mask_crop` and `output`; any other line
//! is a plain prompt. A line whose first non-blank character is `\` is a plain prompt with
//! that backslash removed, so `\#1 fan` and `\{curly}` are prompts, not a comment and JSON.
//! Relative paths in a prompt file are relative to the file's directory (stdin's: the current
//! directory), so a prompt file and its images can move together.

use std::io::{BufRead, IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use flux2_klein::limits::{MAX_IMAGES_PER_RUN, MAX_PROMPT_FILE_BYTES};
use flux2_klein::lora::LoraSpec;
use flux2_klein::pipeline::{Cancel, Cancelled};

use super::args::{parse_guidance, parse_side, parse_strength, PromptArgs};
use super::metadata::Recorded;
use super::progress::Reporter;

/// One job: a prompt, with optional settings of its own (a JSON line, or recorded metadata)
/// that win over the command line's.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptJob {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    /// First seed of this job's images (else --seed).
    pub seed: Option<u64>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub steps: Option<u32>,
    pub guidance: Option<f64>,
    /// Reference images of this job (else --ref; `[]` for none).
    #[serde(rename = "ref")]
    pub refs: Option<Vec<PathBuf>>,
    /// Init image of this job (else --init-image).
    pub init_image: Option<PathBuf>,
    /// Inpainting mask of this job (else --mask).
    pub mask: Option<PathBuf>,
    /// Strength of this job (else --strength).
    pub strength: Option<f64>,
    /// padding_mask_crop of this job (else --padding-mask-crop).
    pub padding_mask_crop: Option<u32>,
    /// Output path of this job's images (else --output), with `{seed}` / `{index}`.
    pub output: Option<PathBuf>,
    /// Adapters of this job (else --lora; `[]` for none).
    #[serde(default, deserialize_with = "lora_list")]
    pub lora: Option<Vec<LoraSpec>>,
    /// The 1-based prompt-file line it came from (for messages).
    #[serde(skip)]
    pub line: Option<usize>,
}

impl PromptJob {
    pub fn plain(prompt: String) -> Self {
        Self {
            prompt,
            negative_prompt: None,
            seed: None,
            width: None,
            height: None,
            steps: None,
            guidance: None,
            refs: None,
            init_image: None,
            mask: None,
            strength: None,
            padding_mask_crop: None,
            output: None,
            lora: None,
            line: None,
        }
    }

    /// The job that made an image, from its recorded metadata.
    pub fn from_recorded(recorded: &Recorded) -> Self {
        // An init image sets the size itself.
        let size = recorded.size.filter(|_| recorded.init_image.is_none());
        Self {
            prompt: recorded.prompt.clone(),
            negative_prompt: recorded.negative_prompt.clone(),
            seed: recorded.seed,
            // Saturated, not wrapped: a hostile value must fail the range checks.
            width: size.map(|s| saturate(s.0)),
            height: size.map(|s| saturate(s.1)),
            steps: recorded.steps.map(saturate),
            guidance: recorded.guidance,
            refs: Some(recorded.references.iter().map(PathBuf::from).collect()),
            init_image: recorded.init_image.as_ref().map(PathBuf::from),
            mask: recorded.mask.as_ref().map(PathBuf::from),
            strength: recorded.strength,
            padding_mask_crop: recorded.padding_mask_crop,
            output: None,
            lora: Some(recorded.loras.clone()),
            line: None,
        }
    }

    /// Makes the job's relative paths (references, init image, mask, output) relative to
    /// `dir`, its prompt file's directory.
    fn resolve_paths(&mut self, dir: &Path) {
        if dir.as_os_str().is_empty() {
            return;
        }
        let under = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        self.refs.iter_mut().flatten().for_each(under);
        [&mut self.init_image, &mut self.mask, &mut self.output]
            .into_iter()
            .flatten()
            .for_each(under);
        // An adapter names a local file or a hub file (`owner/repo/file`, `hf://…`): a
        // relative name is the prompt file's neighbour when such a file exists there.
        for lora in self.lora.iter_mut().flatten() {
            let beside = dir.join(&lora.source);
            if !lora.source.starts_with("hf://")
                && Path::new(&lora.source).is_relative()
                && beside.is_file()
            {
                lora.source = beside.display().to_string();
            }
        }
    }

    /// This job's reference paths: its own, else `default` (the `--ref`s).
    pub fn refs<'a>(&'a self, default: &'a [PathBuf]) -> &'a [PathBuf] {
        self.refs.as_deref().unwrap_or(default)
    }

    /// This job's adapters: its own, else `default` (the `--lora`s).
    pub fn loras<'a>(&'a self, default: &'a [LoraSpec]) -> &'a [LoraSpec] {
        self.lora.as_deref().unwrap_or(default)
    }

    /// The same range checks as the command-line options (their value parsers and
    /// `flux2_klein::limits`).
    pub(super) fn check(&self) -> Result<(), String> {
        for v in [self.width, self.height].into_iter().flatten() {
            parse_side(&v.to_string())?;
        }
        if self.steps == Some(0) {
            return Err("\"steps\" must be at least 1".into());
        }
        if let Some(steps) = self.steps {
            flux2_klein::limits::check_steps(steps as usize).map_err(|e| e.to_string())?;
        }
        if let Some(g) = self.guidance {
            parse_guidance(&g.to_string()).map_err(|e| format!("guidance: {e}"))?;
        }
        if let Some(s) = self.strength {
            parse_strength(&s.to_string()).map_err(|e| format!("\"strength\": {e}"))?;
        }
        Ok(())
    }
}

/// A prompt file's `lora` list: `"PATH[:SCALE]"` strings or `{"path": …, "scale": …}`.
fn lora_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<LoraSpec>>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged, deny_unknown_fields)]
    enum Entry {
        Spec(String),
        Full { path: String, scale: Option<f64> },
    }
    let entries = <Vec<Entry> as serde::Deserialize>::deserialize(d)?;
    entries
        .into_iter()
        .map(|e| match e {
            Entry::Spec(s) => LoraSpec::parse(&s),
            Entry::Full { path, scale } => LoraSpec::new(&path, scale.unwrap_or(1.0)),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("\"lora\": {e}")))
}

fn saturate(v: usize) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// The jobs of `--prompt` or `--prompt-file`, in order (`--config-from-metadata` is read by
/// `generate`, which also checks the PNG's inputs). `-p -` reads the prompt from stdin.
pub fn read(args: &PromptArgs, reporter: &Reporter) -> Result<Vec<PromptJob>> {
    let Some(path) = &args.prompt_file else {
        let Some(prompt) = &args.prompt else {
            return Ok(vec![]);
        };
        if prompt != "-" {
            return Ok(vec![PromptJob::plain(prompt.clone())]);
        }
        let text = read_stdin(reporter, "the prompt, then Ctrl-D")?;
        let prompt = text.trim_end();
        if prompt.is_empty() {
            bail!("-p - read an empty prompt from stdin — pipe the prompt in, or pass -p TEXT");
        }
        return Ok(vec![PromptJob::plain(prompt.to_string())]);
    };
    // (`generate` streams `--prompt-file -` line by line: [`StdinPrompts`].)
    // A regular file, capped (a FIFO or /dev/zero would hang or fill memory).
    let bytes = flux2_klein::limits::read_regular_file(path, MAX_PROMPT_FILE_BYTES, "prompt file")
        .map_err(|e| match path.exists() {
            true => e,
            false => anyhow!("{e} — check the path (or pass - for stdin)"),
        })?;
    let text = String::from_utf8(bytes).map_err(|_| {
        anyhow!(
            "the prompt file {} is not UTF-8 text — save it as UTF-8",
            path.display()
        )
    })?;
    let mut jobs = parse_prompt_lines(&text)
        .map_err(|(line, e)| anyhow!("prompt file {} line {line}: {e}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new(""));
    for job in &mut jobs {
        job.resolve_paths(dir);
    }
    if jobs.is_empty() {
        bail!("{}", no_prompts(path));
    }
    Ok(jobs)
}

/// The error of a prompt file (`-`: stdin) without a prompt.
pub fn no_prompts(path: &Path) -> String {
    format!(
        "the prompt file {} has no prompts — write one per line (blank lines and lines \
         starting with # are skipped)",
        path.display()
    )
}

/// The longest line `--prompt-file -` takes: stdin is read a line at a time, so a line is
/// capped on its own (before it is held in memory) rather than the whole stream.
pub const MAX_STDIN_LINE_BYTES: usize = 1 << 20;

/// The prompts of `--prompt-file -`, each job as soon as its line arrives. A thread reads
/// stdin, so that the caller can notice a signal (SIGINT is restarted, not delivered as an
/// error, while a read waits) and stop between lines; it reads at most a few lines ahead.
pub struct StdinPrompts {
    lines: std::sync::mpsc::Receiver<Result<(usize, String)>>,
}

impl StdinPrompts {
    /// Starts reading stdin; on a terminal, first says so.
    pub fn start(reporter: &Reporter) -> Self {
        if std::io::stdin().is_terminal() {
            reporter.info("reading prompts from stdin: one per line, Ctrl-D to finish");
        }
        let (send, lines) = std::sync::mpsc::sync_channel(4);
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            for number in 1.. {
                let line = read_line(&mut stdin, number);
                let end = !matches!(line, Ok(Some(_)));
                if let Some(line) = line.transpose() {
                    if send.send(line.map(|l| (number, l))).is_err() {
                        return;
                    }
                }
                if end {
                    return;
                }
            }
        });
        Self { lines }
    }

    /// The next job (`None` at the end of stdin), its `line` set: blank lines and comments
    /// are skipped as in a prompt file; a line that is not a prompt is an error naming it.
    /// While no line comes, `cancel` is polled: once set, the error is
    /// `pipeline::Cancelled` (its counts left for the caller to fill in).
    pub fn next(&mut self, cancel: &Cancel) -> Result<Option<PromptJob>> {
        use std::sync::mpsc::RecvTimeoutError;
        loop {
            let (number, text) = match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => line?,
                Err(RecvTimeoutError::Disconnected) => return Ok(None),
                Err(RecvTimeoutError::Timeout) => match cancel.reason() {
                    Some(reason) => {
                        return Err(Cancelled {
                            finished: 0,
                            total: 0,
                            reason,
                        }
                        .into())
                    }
                    None => continue,
                },
            };
            // A byte-order mark can only start the stream.
            let text = match number {
                1 => text.strip_prefix('\u{feff}').unwrap_or(&text),
                _ => &text,
            };
            if let Some(job) =
                parse_line(text, number).map_err(|e| anyhow!("stdin line {number}: {e}"))?
            {
                return Ok(Some(job));
            }
        }
    }
}

/// Line `number` of `input` without its line break, at most [`MAX_STDIN_LINE_BYTES`] read
/// (`None` at the end).
fn read_line(input: &mut impl BufRead, number: usize) -> Result<Option<String>> {
    let mut bytes = Vec::new();
    let cap = MAX_STDIN_LINE_BYTES as u64 + 1;
    let read = input
        .take(cap)
        .read_until(b'\n', &mut bytes)
        .context("reading prompts from stdin")?;
    if read == 0 {
        return Ok(None);
    }
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
    } else if bytes.len() > MAX_STDIN_LINE_BYTES {
        bail!(
            "stdin line {number} is longer than {} MiB — shorten the prompt",
            MAX_STDIN_LINE_BYTES >> 20
        );
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| anyhow!("stdin line {number} is not UTF-8 text — pipe in UTF-8"))
}

/// All of stdin as text; on a terminal, first a hint that it is waiting (`what` to type).
fn read_stdin(reporter: &Reporter, what: &str) -> Result<String> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        reporter.info(&format!("reading from stdin: {what} to finish"));
    }
    let mut text = String::new();
    let read = stdin
        .take(MAX_PROMPT_FILE_BYTES + 1)
        .read_to_string(&mut text);
    if read
        .as_ref()
        .is_ok_and(|&n| n as u64 > MAX_PROMPT_FILE_BYTES)
    {
        bail!(
            "stdin holds more than the {} MiB a prompt file may have",
            MAX_PROMPT_FILE_BYTES >> 20
        );
    }
    read.map(|_| text).map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            anyhow!("stdin is not UTF-8 text — pipe in UTF-8")
        } else {
            anyhow!(e).context("reading prompts from stdin")
        }
    })
}

/// The jobs of a prompt file (see the module documentation). A UTF-8 byte-order mark at the
/// start is dropped (else a first JSON line would read as a plain prompt). Errors carry the
/// 1-based line number.
pub fn parse_prompt_lines(text: &str) -> Result<Vec<PromptJob>, (usize, String)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut jobs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let Some(job) = parse_line(line, i + 1).map_err(|e| (i + 1, e))? else {
            continue;
        };
        if jobs.len() == MAX_IMAGES_PER_RUN {
            return Err((
                i + 1,
                format!("more than {MAX_IMAGES_PER_RUN} prompts (the most images in one run)"),
            ));
        }
        jobs.push(job);
    }
    Ok(jobs)
}

/// The job of prompt-file line `number` (1-based; `None` for a blank line or a comment).
pub fn parse_line(line: &str, number: usize) -> Result<Option<PromptJob>, String> {
    let line = line.trim_end();
    let trimmed = line.trim_start();
    if trimmed.is_empty() || trimmed.starts_with('#') {
        return Ok(None);
    }
    let mut job = if let Some(literal) = trimmed.strip_prefix('\\') {
        // The escape: the rest is the prompt as written (leading blanks kept).
        let blanks = line.len() - trimmed.len();
        PromptJob::plain(format!("{}{literal}", &line[..blanks]))
    } else if trimmed.starts_with('{') {
        let job: PromptJob = serde_json::from_str(trimmed).map_err(|e| e.to_string())?;
        job.check()?;
        job
    } else {
        PromptJob::plain(line.to_string())
    };
    job.line = Some(number);
    Ok(Some(job))
}

/// One image of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Planned<'a> {
    pub job: &'a PromptJob,
    pub seed: u64,
    /// The output template (the job's, else `--output`; `None` = the default name).
    pub output: Option<&'a Path>,
}

/// The images of a run, in order: every job makes `count` images with seeds s, s + 1, …
/// (wrapping), where s is the job's own seed or `first_seed`.
pub fn expand<'a>(
    jobs: &'a [PromptJob],
    count: u32,
    first_seed: u64,
    output: Option<&'a Path>,
) -> Vec<Planned<'a>> {
    jobs.iter()
        .flat_map(|job| {
            let seed = job.seed.unwrap_or(first_seed);
            (0..count as u64).map(move |c| Planned {
                job,
                seed: seed.wrapping_add(c),
                output: job.output.as_deref().or(output),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(p: &str, line: usize) -> PromptJob {
        PromptJob {
            line: Some(line),
            ..PromptJob::plain(p.to_string())
        }
    }

    #[test]
    fn prompt_file_lines() {
        assert_eq!(
            parse_prompt_lines("# header\r\na fox  \r\n\n   \n  # indented comment\n  two words\n"),
            Ok(vec![plain("a fox", 2), plain("  two words", 6)])
        );
        assert_eq!(parse_prompt_lines(""), Ok(vec![]));
        let jobs = parse_prompt_lines(
            "x\n{\"prompt\": \"y\", \"seed\": 7, \"width\": 512, \"ref\": [\"a.png\"], \"output\": \"o.png\"}\n",
        )
        .unwrap();
        assert_eq!(jobs[0], plain("x", 1));
        assert_eq!(jobs[1].prompt, "y");
        assert_eq!(jobs[1].seed, Some(7));
        assert_eq!(jobs[1].width, Some(512));
        assert_eq!(jobs[1].refs, Some(vec![PathBuf::from("a.png")]));
        assert_eq!(jobs[1].output, Some(PathBuf::from("o.png")));
        assert_eq!(jobs[1].line, Some(2));
        let (line, err) = parse_prompt_lines("a\n{\"prompt\": \"b\", \"sede\": 1}").unwrap_err();
        assert_eq!(line, 2);
        assert!(err.contains("sede"), "{err}");
        let (line, err) = parse_prompt_lines("{\"prompt\": \"b\", \"width\": 10}").unwrap_err();
        assert_eq!(line, 1);
        assert!(err.contains("too small"), "{err}");
        assert!(
            parse_prompt_lines("{\"seed\": 1}").is_err(),
            "prompt is required"
        );
        let jobs = parse_prompt_lines(
            "{\"prompt\": \"l\", \"lora\": [\"a.safetensors:0.5\", {\"path\": \"b\", \"scale\": 2}]}",
        )
        .unwrap();
        let got: Vec<_> = jobs[0]
            .loras(&[])
            .iter()
            .map(|s| (s.source.as_str(), s.scale))
            .collect();
        assert_eq!(got, [("a.safetensors", 0.5), ("b", 2.0)]);
        let (_, err) = parse_prompt_lines("{\"prompt\": \"l\", \"lora\": [\"a:x\"]}").unwrap_err();
        assert!(err.contains("not a number"), "{err}");
    }

    #[test]
    fn a_backslash_makes_a_literal_prompt() {
        assert_eq!(
            parse_prompt_lines("\\#1 fan\n  \\{curly} braces\n\\\\x\n#c\n").unwrap(),
            vec![
                plain("#1 fan", 1),
                plain("  {curly} braces", 2),
                plain("\\x", 3)
            ]
        );
    }

    #[test]
    fn prompt_file_paths_are_relative_to_it() {
        let mut job = parse_prompt_lines(
            "{\"prompt\": \"x\", \"ref\": [\"a.png\", \"/abs/b.png\"], \"mask\": \"m.png\", \"output\": \"o/{index}.png\"}",
        )
        .unwrap()
        .remove(0);
        job.resolve_paths(Path::new("batch/dir"));
        assert_eq!(
            job.refs,
            Some(vec![
                PathBuf::from("batch/dir/a.png"),
                PathBuf::from("/abs/b.png")
            ])
        );
        assert_eq!(job.mask, Some(PathBuf::from("batch/dir/m.png")));
        assert_eq!(job.output, Some(PathBuf::from("batch/dir/o/{index}.png")));
        assert_eq!(job.init_image, None);
    }

    #[test]
    fn a_byte_order_mark_is_dropped() {
        let jobs = parse_prompt_lines("\u{feff}{\"prompt\": \"fox\", \"seed\": 5}\nb").unwrap();
        assert_eq!((jobs[0].prompt.as_str(), jobs[0].seed), ("fox", Some(5)));
        assert_eq!(
            parse_prompt_lines("\u{feff}first").unwrap(),
            vec![plain("first", 1)]
        );
    }

    #[test]
    fn stdin_lines_are_capped_before_they_are_held() {
        let mut input = std::io::Cursor::new(b"a fox\r\nlast".to_vec());
        assert_eq!(
            read_line(&mut input, 1).unwrap().as_deref(),
            Some("a fox\r")
        );
        assert_eq!(read_line(&mut input, 2).unwrap().as_deref(), Some("last"));
        assert_eq!(read_line(&mut input, 3).unwrap(), None);
        let mut long = vec![b'x'; MAX_STDIN_LINE_BYTES];
        long.push(b'\n');
        assert!(read_line(&mut std::io::Cursor::new(long.clone()), 1)
            .unwrap()
            .is_some_and(|l| l.len() == MAX_STDIN_LINE_BYTES));
        long.insert(0, b'x');
        let err = read_line(&mut std::io::Cursor::new(long), 4).unwrap_err();
        assert!(err.to_string().contains("line 4 is longer"), "{err}");
        let err = read_line(&mut std::io::Cursor::new(b"\xff\n".to_vec()), 2).unwrap_err();
        assert!(err.to_string().contains("not UTF-8"), "{err}");
        assert_eq!(parse_line("  # c", 3), Ok(None));
        assert_eq!(parse_line("fox ", 3), Ok(Some(plain("fox", 3))));
    }

    #[test]
    fn jobs_times_count() {
        let mut own = PromptJob::plain("b".into());
        own.seed = Some(u64::MAX);
        own.output = Some(PathBuf::from("b-{seed}.png"));
        let jobs = [PromptJob::plain("a".into()), own];
        let out = Path::new("x-{index}.png");
        let images = expand(&jobs, 2, 10, Some(out));
        let got: Vec<(&str, u64, Option<&Path>)> = images
            .iter()
            .map(|p| (p.job.prompt.as_str(), p.seed, p.output))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", 10, Some(out)),
                ("a", 11, Some(out)),
                ("b", u64::MAX, Some(Path::new("b-{seed}.png"))),
                ("b", 0, Some(Path::new("b-{seed}.png"))),
            ]
        );
        assert_eq!(expand(&jobs[..1], 1, 3, None)[0].output, None);
    }
}
