//! The command line: clap derive structs and their value parsers, nothing else. Anything that
//! needs the file system (prompt files, reference images, output directory, model) is checked
//! in `generate`/`bench` before the model loads; the prompt-file format is `jobs`, the PNG
//! metadata `metadata`.
//!
//! Range errors caught here (a width below 64, zero steps, a malformed `--size`) are usage
//! errors: `main` prints them on one line and exits with status 2.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use flux2_klein::limits::{MAX_IMAGES_PER_RUN, MAX_STEPS, MIN_OUTPUT_SIDE};
use flux2_klein::lora::LoraSpec;
use flux2_klein::model_dir::DEFAULT_MODEL;

/// The smallest output side: diffusers accepts any multiple of 16 (`pipeline::resolve_size`;
/// references keep their 64 px minimum, `image_io::MIN_REFERENCE_SIDE`).
pub const MIN_SIDE: u32 = MIN_OUTPUT_SIDE as u32;

/// `--version`: the crate version and what this binary can run on.
#[cfg(feature = "cudnn")]
const BUILD_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (CUDA + cuDNN, CPU)");
#[cfg(all(feature = "cuda", not(feature = "cudnn")))]
const BUILD_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (CUDA, CPU)");
#[cfg(not(feature = "cuda"))]
const BUILD_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (CPU only; build with --features cuda for NVIDIA GPUs)"
);

/// FLUX.2 [klein] text-to-image and multi-reference editing on candle.
#[derive(Debug, Parser)]
#[command(
    name = "flux2-klein",
    version = BUILD_VERSION,
    about,
    propagate_version = true,
    after_help = "Examples:\n  \
        flux2-klein generate -p \"a red fox in the snow\" -o fox.png\n  \
        flux2-klein generate -p \"make it night\" -r day.png -o night.png --seed 7\n  \
        flux2-klein generate --prompt-file prompts.txt -n 4 -o 'out/{index}-{seed}.png'\n  \
        flux2-klein bench --size 512x512 --size 1024x1024 --runs 3\n  \
        flux2-klein info fox.png\n\n\
        Each image's path is the only thing written to stdout (with --json, one JSON record \
        per image); progress, warnings and errors go to stderr."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Only warnings and errors on stderr (results still go to stdout).
    #[arg(
        short,
        long,
        global = true,
        conflicts_with = "verbose",
        display_order = 900
    )]
    pub quiet: bool,

    /// Per-stage timings, per-step log lines and peak device memory.
    #[arg(short, long, global = true, display_order = 901)]
    pub verbose: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make images from a prompt (or a prompt file), optionally edited from / conditioned on
    /// reference images.
    Generate(GenerateArgs),
    /// Time the pipeline (loaded once, kept resident) over sizes and reference counts.
    Bench(BenchArgs),
    /// Compare two images (golden-image checks): prints the max / mean difference and PSNR;
    /// exits 0 when they are the same or within tolerance, 1 when they differ, 2 when they
    /// cannot be compared (missing or unreadable file, not an image, another size).
    Compare(CompareArgs),
    /// Download every file the model needs into the Hugging Face cache (or check a local
    /// directory) and print where it is: a setup step for offline runs and CI jobs.
    Fetch(FetchArgs),
    /// Print the settings recorded in an image flux2-klein wrote (PNG, JPEG or WebP).
    Info(InfoArgs),
    /// Serve the models warm over HTTP: the OpenAI Images API (/v1/images/generations,
    /// /v1/images/edits, /v1/models), /v1/generate (a prompt-file line in, the image out),
    /// /health and /metrics. One device worker runs the requests from a bounded queue.
    Serve(ServeArgs),
}

/// The default port of `serve` (Gradio's and sd-webui's, where clients look first).
pub const DEFAULT_PORT: u16 = 7860;

#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:\n  \
    flux2-klein serve --model ./klein-4b\n  \
    curl -s localhost:7860/v1/images/generations -H 'Content-Type: application/json' \\\n    \
      -d '{\"prompt\": \"a red fox in snow\", \"size\": \"512x512\", \"seed\": 7}'\n  \
    FLUX2_KLEIN_API_KEY=secret flux2-klein serve --host 0.0.0.0\n\n\
    The first line on stdout is \"listening on http://HOST:PORT\" (with --port 0 the port the \
    system chose); each request is logged on stderr. SIGINT/SIGTERM stop accepting, finish \
    the running images and exit 0.")]
pub struct ServeArgs {
    /// Address to listen on. Anything but a loopback address (127.0.0.1, ::1, localhost)
    /// needs --api-key (or FLUX2_KLEIN_API_KEY), unless --insecure-no-auth is given.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    pub host: String,

    /// Port to listen on (0 = one the system picks, printed at start).
    #[arg(long, value_name = "PORT", default_value_t = DEFAULT_PORT)]
    pub port: u16,

    /// Require `Authorization: Bearer KEY` on the /v1 routes (/health and /metrics stay
    /// open for probes and scrapers).
    #[arg(
        long,
        value_name = "KEY",
        env = "FLUX2_KLEIN_API_KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,

    /// Serve a non-loopback --host without an API key (anyone who can reach the port can
    /// use the GPU).
    #[arg(long)]
    pub insecure_no_auth: bool,

    /// Requests waiting for the device worker before new ones get 429 Too Many Requests
    /// (with Retry-After).
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_queue: u32,

    /// Largest request body in MiB (uploaded images included); larger ones get 413.
    #[arg(long, value_name = "MIB", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_body_mib: u32,

    /// Most images one request may ask for (`n`).
    #[arg(long, value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_n: u32,

    /// The requests' defaults (a request's `steps` / `guidance` win); --lora applies to
    /// every request; --max-area caps every request's size.
    #[command(flatten)]
    pub sampling: SamplingArgs,

    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(Debug, Clone, Args)]
pub struct InfoArgs {
    /// The image (PNG, JPEG or WebP).
    pub image: PathBuf,
    /// Print the settings as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct FetchArgs {
    #[command(flatten)]
    pub source: ModelSource,

    /// Also fetch (or check) a single-file transformer checkpoint, as `generate
    /// --transformer` takes it (a .safetensors file or a hub repo id holding one).
    #[arg(long, value_name = "PATH_OR_REPO")]
    pub transformer: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// The reference (golden) image.
    pub expected: std::path::PathBuf,
    /// The image to check.
    pub actual: std::path::PathBuf,
    /// Largest allowed difference of one channel value (0 = bit-identical pixels).
    #[arg(long, default_value_t = 0)]
    pub max_diff: u8,
    /// Also require at least this PSNR in dB.
    #[arg(long, value_name = "DB", value_parser = parse_finite)]
    pub min_psnr: Option<f64>,
    /// Print the result as one JSON object, also on failure: its `verdict` is `same`,
    /// `within`, `differs` or `error`, its `message` says why.
    #[arg(long)]
    pub json: bool,
    /// Also write an image of where they differ (.png, .jpg or .webp): each channel's
    /// difference scaled so that the largest is white; black where they are the same.
    #[arg(long, value_name = "PATH")]
    pub diff_image: Option<std::path::PathBuf>,
}

/// Where the prompts come from: `--prompt` (one), `--prompt-file` (batch mode) or
/// `--config-from-metadata` (the settings of an image made before, where `--prompt` may
/// replace the recorded prompt).
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = true)]
pub struct PromptArgs {
    /// The prompt (`-` reads it from stdin).
    #[arg(short, long, value_name = "TEXT")]
    pub prompt: Option<String>,

    /// Batch mode: one prompt per line (blank lines and lines starting with `#` are
    /// skipped), or a JSON object per line with per-image settings ({"prompt": …,
    /// "seed": …, "width": …, "height": …, "ref": […], "output": …, "negative_prompt": …,
    /// "steps": …, "guidance": …, "init_image": …, "mask": …, "strength": …,
    /// "padding_mask_crop": …, "lora": ["a.safetensors:0.8", {"path": …, "scale": …}]}). The
    /// models load once for all of them. `-` streams stdin: each line's images start as soon
    /// as it arrives (the models stay loaded), `{index}` is not zero-padded and the default
    /// name is flux2-klein-{index}-{seed}.png (the total is not known); a bad line stops the
    /// run (exit 1) after the images before it.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["prompt", "config_from_metadata"])]
    pub prompt_file: Option<PathBuf>,

    /// Make an image again from one flux2-klein wrote (PNG, JPEG or WebP): its prompt, seed,
    /// size, steps, guidance, negative prompt, references, init image, mask, strength, model
    /// and revision, dtype, VAE dtype and tiling come from its metadata (relative paths are
    /// looked for next to the image first); any of those options given here wins (e.g. a new
    /// --seed for a variation, or a new --prompt).
    #[arg(long, value_name = "IMAGE")]
    pub config_from_metadata: Option<PathBuf>,
}

/// Which model: a hub repo (at a revision) or a local directory.
#[derive(Debug, Clone, Args)]
pub struct ModelSource {
    /// Hugging Face repo id or local directory in the diffusers layout
    /// (model_index.json, text_encoder/, tokenizer/, transformer/, vae/)
    /// [default: black-forest-labs/FLUX.2-klein-4B; with --config-from-metadata, the
    /// recorded model].
    #[arg(short, long, value_name = "REPO_OR_DIR", env = "FLUX2_KLEIN_MODEL")]
    pub model: Option<String>,

    /// Hub revision (branch, tag or commit) of the model repo.
    #[arg(long, value_name = "REV", value_parser = parse_revision)]
    pub revision: Option<String>,
}

impl ModelSource {
    /// The model to resolve; an empty value (e.g. `FLUX2_KLEIN_MODEL=` in a CI config) means
    /// the default, as if unset.
    pub fn model_id(&self) -> &str {
        match self.model.as_deref().map(str::trim) {
            None | Some("") => DEFAULT_MODEL,
            Some(m) => m,
        }
    }

    /// Whether a model was asked for (`-m` or `FLUX2_KLEIN_MODEL`, not empty).
    pub fn model_given(&self) -> bool {
        self.model.as_deref().is_some_and(|m| !m.trim().is_empty())
    }

    /// The model's configs and files (a local directory, or the hub repo through its cache).
    pub fn resolve(&self) -> anyhow::Result<flux2_klein::model_dir::ModelDir> {
        flux2_klein::model_dir::ModelDir::resolve(self.model_id(), self.revision.as_deref())
    }
}

/// Which weights, on which device, in which dtype.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    #[command(flatten)]
    pub source: ModelSource,

    /// auto (CUDA when built with `--features cuda` and a GPU is present, else CPU), cpu,
    /// cuda or cuda:N.
    #[arg(long, value_name = "DEVICE", default_value = "auto", value_parser = parse_device)]
    pub device: DeviceArg,

    /// Compute dtype of the text encoder and transformer [default: bf16 on CUDA, f32 on CPU].
    #[arg(long, value_enum, value_name = "DTYPE")]
    pub dtype: Option<DTypeArg>,

    /// VAE dtype [default: the --dtype].
    #[arg(long, value_enum, value_name = "DTYPE")]
    pub vae_dtype: Option<DTypeArg>,

    /// Tiled VAE with tiles of N latent pixels (lower memory for large images).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub vae_tile: Option<u32>,

    /// One single-file checkpoint that replaces --model's transformer weights: a .safetensors
    /// file with BFL names (as flux-2-klein-4b.safetensors) or diffusers names, bf16/f32 or
    /// fp8 (BFL's flux-2-klein-4b-fp8.safetensors, ComfyUI's scaled fp8), or a hub repo id
    /// holding one such file (black-forest-labs/FLUX.2-klein-4b-fp8). The architecture still
    /// comes from --model's transformer/config.json.
    #[arg(long, value_name = "PATH_OR_REPO")]
    pub transformer: Option<String>,

    /// Quantise at load: `fp8` stores the transformer's block linears and the text encoder's
    /// linears as fp8 E4M3 with one scale per tensor (amax/448, as BFL's fp8 files); on the
    /// CPU the weights are then dequantised, so the numbers are the fp8 model's.
    #[arg(long, value_enum, value_name = "KIND")]
    pub quantize: Option<QuantizeArg>,
}

/// `--quantize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QuantizeArg {
    Fp8,
}

/// Sampling options shared by `generate` and `bench`.
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Denoising steps, at most 1000 [default: 4 for distilled checkpoints, 50 for base ones].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=MAX_STEPS as i64))]
    pub steps: Option<u32>,

    /// Classifier-free guidance scale [default: 1.0 distilled, 4.0 base]; distilled
    /// checkpoints never run CFG, so values above 1 are ignored there (with a warning).
    #[arg(
        long,
        visible_alias = "cfg-scale",
        value_name = "SCALE",
        value_parser = parse_guidance
    )]
    pub guidance: Option<f64>,

    /// Largest output area in megapixels (1 MP = 2^20 pixels, so 4 is 2048×2048), at most 64:
    /// larger sizes are refused before anything loads.
    #[arg(long, value_name = "MP", default_value_t = 4.0, value_parser = parse_max_area)]
    pub max_area: f64,

    /// LoRA/LoKr adapter for the transformer, PATH[:SCALE] (repeatable: the deltas add up,
    /// each at its scale) [default scale: 1]. A local .safetensors file, or a hub file as
    /// owner/repo/file.safetensors or hf://owner/repo/file.safetensors. diffusers/peft,
    /// ai-toolkit, BFL-PEFT, kohya/musubi and LoKr layouts; merged into the weights at load.
    #[arg(long = "lora", value_name = "PATH[:SCALE]", value_parser = parse_lora)]
    pub loras: Vec<LoraSpec>,
}

/// `--lora PATH[:SCALE]`: the scale a finite number.
fn parse_lora(s: &str) -> Result<LoraSpec, String> {
    LoraSpec::parse(s)
}

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub prompt: PromptArgs,

    /// Reference image (repeatable; the order gives T = 10, 20, …). The model was trained
    /// with up to 4.
    #[arg(
        short = 'r',
        long = "ref",
        visible_alias = "ref-image",
        value_name = "PATH"
    )]
    pub refs: Vec<PathBuf>,

    /// Output width in pixels, floored to a multiple of 16 [default: the first reference's
    /// cropped width, else 1024].
    #[arg(short = 'W', long, value_name = "PX", value_parser = parse_side)]
    pub width: Option<u32>,

    /// Output height in pixels, floored to a multiple of 16 [default: the first reference's
    /// cropped height, else 1024].
    #[arg(short = 'H', long, value_name = "PX", value_parser = parse_side)]
    pub height: Option<u32>,

    #[command(flatten)]
    pub sampling: SamplingArgs,

    #[command(flatten)]
    pub inpaint: InpaintArgs,

    /// Negative prompt of classifier-free guidance (base checkpoints with --guidance > 1;
    /// ignored, with a warning, by distilled ones) [default: "", as diffusers].
    #[arg(long, value_name = "TEXT")]
    pub negative_prompt: Option<String>,

    /// Seed of the (torch-compatible CPU) noise generator; -1 = a random one, as unset
    /// [default: random, printed and recorded]. With --count the images of a prompt use
    /// seeds S, S+1, …
    #[arg(long, value_name = "N", value_parser = parse_seed, allow_negative_numbers = true)]
    pub seed: Option<SeedArg>,

    /// Images per prompt, with consecutive seeds (the models load once).
    #[arg(
        short = 'n',
        long,
        visible_alias = "batch-count",
        value_name = "N",
        default_value_t = 1,
        value_parser = parse_count
    )]
    pub count: u32,

    /// Output image: .png (with the parameters as text chunks), .jpg/.jpeg or .webp
    /// (lossless), the last two with the parameters as JSON in the EXIF UserComment. `{seed}` is replaced by the seed and `{index}` by the image's number in
    /// the run (1, 2, …, zero-padded); several images need one of them so that the names
    /// differ. [default: flux2-klein-{seed}.png, batches flux2-klein-{index}-{seed}.png]
    #[arg(short, long, value_name = "PATH")]
    pub output: Option<PathBuf>,

    /// JPEG quality of .jpg/.jpeg outputs, 1-100.
    #[arg(long, value_name = "N", default_value_t = flux2_klein::image_io::JPEG_QUALITY,
          value_parser = clap::value_parser!(u8).range(1..=100))]
    pub jpeg_quality: u8,

    /// Keep every model loaded for the whole run: the first image of a batch comes sooner and
    /// no model is reloaded, at the memory of all of them together (~17 GiB for klein-4B in
    /// bf16). By default a batch runs stage by stage, one model in memory at a time.
    #[arg(long)]
    pub resident: bool,

    /// Run only part K of N of the batch (1 ≤ K ≤ N): the prompts (prompt-file lines, or the
    /// one --prompt) whose number i (1, 2, …) satisfies i ≡ K (mod N). Every image keeps the
    /// seed and output name it has in the whole run, so N runs (a Slurm or Kubernetes job
    /// array) together make exactly the images of one run.
    #[arg(long, value_name = "K/N", value_parser = parse_shard)]
    pub shard: Option<Shard>,

    /// Skip the images whose output file exists already (e.g. when re-running a job array
    /// after failures); nothing loads when all of them exist. Needs fixed seeds (--seed N, or a
    /// "seed" on every prompt-file line): with random ones the names would change.
    #[arg(long)]
    pub skip_existing: bool,

    /// For scripts: one JSON object per image on stdout (one line each, as the image is
    /// written) instead of its path: path, prompt, seed, width, height, steps, guidance,
    /// references, model and the per-stage times in milliseconds.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub model: ModelArgs,
}

/// Inpainting and image-to-image (diffusers' `Flux2KleinInpaintPipeline`).
#[derive(Debug, Clone, Args)]
pub struct InpaintArgs {
    /// Image-to-image / inpainting: start from this image instead of pure noise (diffusers'
    /// `image`). The output has its size, floored to a multiple of 16 (shrunk first above
    /// 1024² pixels); --ref images still condition it.
    #[arg(long, value_name = "PATH")]
    pub init_image: Option<PathBuf>,

    /// Inpainting mask for --init-image: white = repaint, black = keep (converted to grey,
    /// resized to the output and binarized at 50% as diffusers' mask processor does)
    /// [default: all white, i.e. image-to-image].
    #[arg(long, value_name = "PATH")]
    pub mask: Option<PathBuf>,

    /// How much of the init image is repainted, in [0, 1]: the last ⌈steps·S⌉ of the --steps
    /// run, from the init image noised to that point (1 = from pure noise) [default: 0.8].
    #[arg(long, value_name = "S", value_parser = parse_strength, allow_negative_numbers = true)]
    pub strength: Option<f64>,

    /// Inpaint only the crop around the mask's white area, grown by N pixels and to the
    /// image's aspect ratio, at the full output size, then paste it back (diffusers'
    /// `padding_mask_crop`; needs --mask).
    #[arg(long, value_name = "N")]
    pub padding_mask_crop: Option<u32>,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// The prompt used for every run.
    #[arg(
        short,
        long,
        value_name = "TEXT",
        default_value = "a photo of a red fox sitting in fresh snow, golden hour"
    )]
    pub prompt: String,

    /// Output size WxH (repeatable).
    #[arg(long = "size", value_name = "WxH", value_parser = parse_size, default_value = "1024x1024")]
    pub sizes: Vec<Size>,

    /// Reference images used by every run (repeatable).
    #[arg(short = 'r', long = "ref", value_name = "PATH")]
    pub refs: Vec<PathBuf>,

    /// Timed runs per size.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,

    /// Untimed runs before the timed runs of each size (the first one also loads every
    /// component).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub warmup: u32,

    /// Images per run: each run is one batch of N images (seeds --seed, --seed+1, …), as
    /// `generate -n N` makes them; the table shows per-image means (work the batch shares,
    /// such as the prompt or a KV checkpoint's reference pass, counts for its first image).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub batch: u32,

    #[command(flatten)]
    pub sampling: SamplingArgs,

    /// Image-to-image / inpainting runs: the init image is LANCZOS-resized to each --size.
    #[command(flatten)]
    pub inpaint: InpaintArgs,

    /// Seed of every run.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,

    /// One JSON object (every run, per-stage times) on stdout instead of the table.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub model: ModelArgs,
}

/// `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceArg {
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceArg::Auto => write!(f, "auto"),
            DeviceArg::Cpu => write!(f, "cpu"),
            DeviceArg::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// `--dtype`, `--vae-dtype`: the two dtypes the spec's dtype rules (§1) cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    #[value(alias = "bfloat16")]
    Bf16,
    #[value(alias = "float32")]
    F32,
}

/// `--seed`: a number, or `-1` for a random seed (stable-diffusion.cpp's convention).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedArg {
    Random,
    Fixed(u64),
}

impl GenerateArgs {
    /// The seed given with `--seed N` (`None` unset or `--seed -1`: random).
    pub fn fixed_seed(&self) -> Option<u64> {
        match self.seed {
            Some(SeedArg::Fixed(s)) => Some(s),
            _ => None,
        }
    }
}

/// `--shard K/N`: part `k` (1-based) of `n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub k: usize,
    pub n: usize,
}

impl Shard {
    /// Whether the job with 0-based index `job` is in this part: its number i = job + 1
    /// satisfies i ≡ K (mod N).
    pub fn runs(&self, job: usize) -> bool {
        job % self.n == self.k - 1
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.k, self.n)
    }
}

/// `--size WxH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub width: u32,
    pub height: u32,
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

fn parse_device(s: &str) -> Result<DeviceArg, String> {
    let lower = s.trim().to_ascii_lowercase();
    match lower.as_str() {
        "auto" => return Ok(DeviceArg::Auto),
        "cpu" => return Ok(DeviceArg::Cpu),
        "cuda" | "gpu" => return Ok(DeviceArg::Cuda(0)),
        _ => {}
    }
    if let Some(n) = lower.strip_prefix("cuda:") {
        if let Ok(n) = n.parse() {
            return Ok(DeviceArg::Cuda(n));
        }
    }
    Err("expected auto, cpu, cuda or cuda:N (N = GPU index)".into())
}

pub(super) fn parse_side(s: &str) -> Result<u32, String> {
    let v: u32 = s
        .trim()
        .parse()
        .map_err(|_| format!("expected a number of pixels, got {s:?}"))?;
    if v < MIN_SIDE {
        return Err(format!(
            "{v} px is too small: sides must be at least {MIN_SIDE} px"
        ));
    }
    Ok(v)
}

/// `-n/--count`: a habitual `-n "blurry"` (sd.cpp's and mold's negative prompt) gets a hint.
fn parse_revision(s: &str) -> Result<String, String> {
    flux2_klein::model_dir::check_revision(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string().trim_start_matches("--revision ").to_string())
}

fn parse_count(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(n) if n as usize > MAX_IMAGES_PER_RUN => Err(format!(
            "{n} images is more than the {MAX_IMAGES_PER_RUN} allowed in one run"
        )),
        Ok(n) if n >= 1 => Ok(n),
        Ok(_) => Err("at least 1 image is needed".into()),
        Err(_) => Err(format!(
            "expected a number of images, got {s:?} (-n is --count here; a negative prompt is \
             --negative-prompt TEXT)"
        )),
    }
}

fn parse_seed(s: &str) -> Result<SeedArg, String> {
    match s.trim() {
        "-1" => Ok(SeedArg::Random),
        t => t.parse().map(SeedArg::Fixed).map_err(|_| {
            format!(
                "expected a seed from 0 to {} or -1 for a random one, got {s:?}",
                u64::MAX
            )
        }),
    }
}

fn parse_shard(s: &str) -> Result<Shard, String> {
    let error = || format!("expected K/N, part K of N with 1 ≤ K ≤ N (e.g. 2/8), got {s:?}");
    let (k, n) = s.trim().split_once('/').ok_or_else(error)?;
    let number = |v: &str| v.trim().parse::<usize>().map_err(|_| error());
    let (k, n) = (number(k)?, number(n)?);
    if k == 0 || k > n {
        return Err(error());
    }
    Ok(Shard { k, n })
}

pub fn parse_size(s: &str) -> Result<Size, String> {
    let (w, h) = s
        .split_once(['x', 'X', '×'])
        .ok_or_else(|| format!("expected WIDTHxHEIGHT such as 1024x1024, got {s:?}"))?;
    Ok(Size {
        width: parse_side(w)?,
        height: parse_side(h)?,
    })
}

/// `--min-psnr`: any finite number (NaN would make every comparison fail or pass).
fn parse_finite(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(format!("expected a finite number, got {s:?}")),
    }
}

/// `--max-area MP`: megapixels within `limits::check_max_area`'s bounds.
fn parse_max_area(s: &str) -> Result<f64, String> {
    let mp = parse_finite(s)?;
    let ceiling = flux2_klein::limits::MAX_AREA_CEILING / flux2_klein::limits::MEGAPIXEL;
    if !(mp > 0.0 && mp <= ceiling as f64) {
        return Err(format!(
            "expected megapixels above 0 and at most {ceiling}, got {s:?}"
        ));
    }
    Ok(mp)
}

impl SamplingArgs {
    /// `--max-area` in pixels.
    pub fn max_area_px(&self) -> u64 {
        let min = (MIN_OUTPUT_SIDE * MIN_OUTPUT_SIDE) as u64;
        ((self.max_area * flux2_klein::limits::MEGAPIXEL as f64) as u64).max(min)
    }
}

pub(super) fn parse_guidance(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(g) if g.is_finite() && g >= 0.0 => Ok(g),
        _ => Err(format!("expected a number ≥ 0, got {s:?}")),
    }
}

/// `--strength` and the prompt file's `"strength"`: a finite number in [0, 1].
pub(super) fn parse_strength(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("expected a strength in [0, 1], got {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parsers() {
        assert_eq!(parse_device("cuda:1"), Ok(DeviceArg::Cuda(1)));
        assert_eq!(parse_device("CUDA"), Ok(DeviceArg::Cuda(0)));
        assert!(parse_device("metal").is_err());
        assert_eq!(
            parse_size("512x768"),
            Ok(Size {
                width: 512,
                height: 768
            })
        );
        assert!(parse_size("8x512").is_err());
        assert!(parse_side("15").is_err());
        assert_eq!(parse_side("16"), Ok(16));
        assert!(parse_finite("NaN").is_err());
        assert!(parse_max_area("65").is_err() && parse_max_area("0").is_err());
        assert!(parse_count("100001").is_err());
        assert!(parse_guidance("nan").is_err());
        assert_eq!(parse_count("3"), Ok(3));
        assert_eq!(parse_seed("-1"), Ok(SeedArg::Random));
        assert_eq!(parse_seed("7"), Ok(SeedArg::Fixed(7)));
        assert!(parse_seed("-2")
            .unwrap_err()
            .contains("-1 for a random one"));
        assert!(parse_count("0").is_err());
        assert_eq!(parse_shard("2/3"), Ok(Shard { k: 2, n: 3 }));
        assert_eq!(parse_shard("1/1"), Ok(Shard { k: 1, n: 1 }));
        for bad in ["0/3", "4/3", "a/b", "3", "1/0", "-1/3", ""] {
            assert!(parse_shard(bad).unwrap_err().contains("K/N"), "{bad}");
        }
        let shard = Shard { k: 3, n: 3 };
        let jobs: Vec<usize> = (0..7).filter(|&j| shard.runs(j)).collect();
        assert_eq!(jobs, [2, 5], "jobs 3 and 6");
        assert!(parse_count("blurry, lowres")
            .unwrap_err()
            .contains("--negative-prompt"));
    }
}
