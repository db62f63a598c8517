//! The command-line grammar. `smolvm --help` is written to teach the whole tool.

use std::path::PathBuf;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use smolvm::sandbox::presets::{self, Preset};

#[derive(Debug, Parser)]
#[command(
    name = "smolvm",
    version,
    about = "Disposable, hardware-isolated Linux sandboxes (microVMs) for AI agents",
    long_about = "smolvm boots small Linux virtual machines from images this project builds itself \
(a Debian kernel and a Debian trixie base rootfs), every byte pinned by SHA-256 in the binary.",
    after_help = "\
QUICK START:
  smolvm create --name box                 boot a sandbox (downloads and verifies the images once)
  smolvm exec box -- uname -a              run a command; exit code, stdout, stderr pass through
  smolvm cp ./file box:/root/file          copy in (or box:/path ./local to copy out)
  smolvm ssh box                           interactive shell (strict host key, managed key)
  smolvm delete box                        kill it and remove its disk (no clean power-off needed)

PRESETS (the same base, with an AI coding agent's tooling as a layer on top):
  smolvm {presets}   [--name N] [--no-attach]
  smolvm preset list                       layer sizes, and which are cached

LIFECYCLE:
  list | status NAME | stop NAME | start NAME | delete NAME | logs NAME
  pause NAME | resume NAME                 save memory+disk and end the VM; continue it later
  snapshot NAME [--name SNAP]              save it while it runs; snapshot list | delete SNAP
  create --from-snapshot SNAP              a new sandbox continuing from a snapshot
  fork NAME [--count K]                    new sandboxes continuing from NAME as it is now
  create --cold                            boot the kernel instead of the boot snapshot
  expose NAME GUEST_PORT [HOST_PORT]       forward 127.0.0.1:HOST_PORT to the guest
  logs NAME [--network]                    console log, or the connections the policy refused

NETWORK (enforced by smolvm on every connection; the host is never reachable by default):
  create --network nat                     default: the internet only; never the host, other
                                           sandboxes, private ranges or metadata services
  create --network none                    nothing out (ssh, exec, cp and expose still work)
  create --allow-domain a.example --allow-domain '*.b.example' --allow-cidr 203.0.113.0/24
                                           only these (names checked per connection: TLS SNI,
                                           HTTP Host, and the address the name resolved to)
  create --allow-host-port 11434           the host's 127.0.0.1:11434 at 10.0.2.2:11434
                                           (host.smolvm.internal) in the guest
  network set NAME [same flags]            replace the policy of a running sandbox, no restart
  network show NAME                        the policy and the last refused connections
  env set NAME K=V | env list NAME | env unset NAME K   variables for login shells in the guest

SECRETS (API keys that never enter the sandbox):
  create --secret OPENAI_API_KEY@api.openai.com   the guest's OPENAI_API_KEY is a placeholder;
                                           smolvm puts the real value (this shell's) into
                                           HTTPS requests to api.openai.com, and nowhere else
  secret list NAME | secret set NAME VAR@HOST | secret unset NAME VAR
  doctor                                   what this host can run (KVM or TCG, and why)

SERVE (E2B's API and MCP for programs; the official E2B SDKs work unchanged):
  smolvm serve [--listen 127.0.0.1:49999]  prints E2B_API_KEY, E2B_API_URL, E2B_SANDBOX_URL;
                                           the key is kept 0600 in SMOLVM_HOME/serve/api-key;
                                           /openapi.json describes it, MCP is at /mcp
  smolvm mcp                               an MCP server on stdio (claude mcp add smolvm -- smolvm mcp)

IMAGE SOURCES (defaults: the release pinned in this binary):
  SMOLVM_IMAGES_URL=http://host/dir        download <dir>/<tag>/<asset> instead (a mirror)
  SMOLVM_IMAGES_MANIFEST=<path|url>        use another release's manifest.json (warns)
  smolvm image import DIR/<tag>            load a locally built release into the cache
  smolvm image list | pull | verify | prune

IMAGES (for maintainers and air-gapped hosts):
  smolvm image build all --out dist      build kernel + base rootfs, write dist/<tag>/ (a release)
  smolvm image build kernel --out DIR    only the guest kernel (vmlinux ELF + bzImage)
  smolvm image build base --out DIR      only the base rootfs (ext4, smolvm-init at /init)
  smolvm image pin dist/<tag>            pin that release in recipes/release.toml (then rebuild)
  smolvm image show                      the pins compiled into this binary

Builds are cached by recipe hash under /var/cache/smolvm/build (SMOLVM_BUILD_CACHE).
State lives in SMOLVM_HOME (default ~/.local/share/smolvm, images in ~/.cache/smolvm).
Logs: -v / -vv, or SMOLVM_LOG=debug. Every command takes --json for machine-readable output."
)]
pub struct Cli {
    /// More log output on stderr (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Print the result as JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create and boot a sandbox; returns when it is ready.
    Create(CreateArgs),
    /// List sandboxes.
    #[command(alias = "ls")]
    List,
    /// Show one sandbox: state, resources, ports, boot phases.
    Status { name: String },
    /// Run a command in a sandbox (through its agent, no SSH); exit code, stdout and stderr
    /// pass through, stdin too when it is not a terminal; Ctrl-C reaches the command.
    Exec {
        name: String,
        /// Allocate a terminal (for interactive programs; runs over SSH).
        #[arg(short, long)]
        tty: bool,
        /// Kill the command after this many seconds (exit status 124).
        #[arg(long)]
        timeout: Option<u64>,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Open a shell in a sandbox over SSH, or run a command (after `--`) with a terminal.
    Ssh {
        name: String,
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Copy files: `smolvm cp ./local NAME:/path` or `smolvm cp NAME:/path ./local`.
    Cp { from: String, to: String },
    /// Power a sandbox off cleanly (forced after --timeout seconds).
    Stop {
        name: String,
        #[arg(long, default_value_t = smolvm::sandbox::DEFAULT_STOP_TIMEOUT.as_secs())]
        timeout: u64,
    },
    /// Boot a stopped sandbox again, with its disk as it was.
    Start {
        name: String,
        #[arg(long, default_value_t = smolvm::sandbox::DEFAULT_READY_TIMEOUT.as_secs())]
        timeout: u64,
    },
    /// Save a running sandbox's memory, devices and disk and end its QEMU: it holds no host
    /// memory and survives a host reboot. `resume` continues it where it was.
    Pause { name: String },
    /// Continue a paused sandbox where it was (processes, open files, memory).
    Resume {
        name: String,
        #[arg(long, default_value_t = smolvm::sandbox::DEFAULT_READY_TIMEOUT.as_secs())]
        timeout: u64,
    },
    /// Snapshots: `smolvm snapshot NAME [--name SNAP]` saves running NAME (memory, devices,
    /// disk) while it keeps running; `smolvm snapshot list`; `smolvm snapshot delete SNAP`.
    /// New sandboxes continue from one with `smolvm create --from-snapshot SNAP`.
    Snapshot(SnapshotArgs),
    /// New sandboxes that continue from running NAME as it is now (memory included), each with
    /// its own disk, hostname, SSH host key and random state.
    Fork {
        name: String,
        /// How many.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// The new sandbox's name (with --count K: NAME-1 ... NAME-K); default: generated.
        #[arg(long = "name")]
        new_name: Option<String>,
        #[arg(long, default_value_t = smolvm::sandbox::DEFAULT_READY_TIMEOUT.as_secs())]
        timeout: u64,
    },
    /// Delete a sandbox: its VM is killed (its disk is thrown away, so no clean power-off is
    /// needed), its disk and record removed.
    #[command(alias = "rm")]
    Delete {
        names: Vec<String>,
        /// Accepted for scripts written for older versions: delete never waits for the guest.
        #[arg(short, long, hide = true)]
        force: bool,
    },
    /// Print a sandbox's console log (kernel and init messages), or with --network the
    /// connections its network policy refused.
    Logs {
        name: String,
        /// The refused connections (one JSON line each), not the console.
        #[arg(long)]
        network: bool,
    },
    /// A sandbox's network policy: show it, or replace it while the sandbox runs.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Forward 127.0.0.1:HOST_PORT (default: a free port) to GUEST_PORT in the sandbox.
    Expose { name: String, guest_port: u16, host_port: Option<u16> },
    /// Environment variables for login shells in a sandbox.
    #[command(subcommand)]
    Env(EnvCommand),
    /// A sandbox's secrets: names and hosts (never values); set or unset them while it runs.
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Serve E2B's API (control plane and in-sandbox API) on a local port, so that the
    /// official E2B SDKs and tools built on them drive smolvm sandboxes; MCP at /mcp.
    /// Prints the environment a client needs (E2B_API_KEY, E2B_API_URL, E2B_SANDBOX_URL).
    Serve(ServeArgs),
    /// An MCP server on stdin/stdout: tools to create sandboxes, run commands, read and write
    /// files, list and delete sandboxes (for Claude Code, Codex, any MCP client).
    Mcp,
    /// Check this host: QEMU, accelerator (KVM or TCG, and why), tools, directories.
    Doctor,
    /// Build, pin, fetch and inspect the kernel and rootfs images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// The presets: layer size and whether it is cached.
    #[command(subcommand)]
    Preset(PresetListCommand),
    /// (internal) The agent proxy of one sandbox, started by smolvm itself.
    #[command(name = "__agent-proxy", hide = true)]
    AgentProxy {
        /// The sandbox's `run/` directory (the process works in its current directory).
        dir: PathBuf,
        /// The uid whose clients are served.
        #[arg(long)]
        owner: u32,
    },
    /// (internal) The network process of one sandbox, started by smolvm itself.
    #[command(name = "__netd", hide = true)]
    Netd {
        /// The sandbox's `run/` directory (the process works in its current directory).
        dir: PathBuf,
        /// The uid whose clients are served.
        #[arg(long)]
        owner: u32,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where to listen (port 0: any free port, printed).
    #[arg(long, default_value = "127.0.0.1:49999")]
    pub listen: String,
    /// Allow an address other than loopback: whoever reaches it and has the key runs code in
    /// your sandboxes (plain HTTP: the key travels unencrypted).
    #[arg(long)]
    pub allow_remote: bool,
    /// Seconds a sandbox created without a timeout lives (E2B's default).
    #[arg(long, default_value_t = 300)]
    pub default_timeout: u64,
    /// Let API callers give a sandbox the host's ports (allow_host_ports) or private ranges
    /// (allow_private). Off: such a network policy is refused with 403.
    #[arg(long)]
    pub allow_host_access: bool,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub command: Option<SnapshotCommand>,
    /// The sandbox to snapshot.
    pub sandbox: Option<String>,
    /// The snapshot's name (default: SANDBOX-<unix time>).
    #[arg(long)]
    pub name: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// The snapshots: source, size, when.
    List,
    /// Delete snapshots (sandboxes made from them keep running).
    Delete {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum NetworkCommand {
    /// Replace the policy (every flag not given goes back to its default): applied to new
    /// connections at once if the sandbox runs, kept across stop/start.
    Set {
        name: String,
        #[command(flatten)]
        policy: NetworkArgs,
    },
    /// The policy, and how many connections it refused (the last few with their rule).
    Show { name: String },
}

/// What a sandbox may reach (`create`, `<preset> start`, `network set`).
#[derive(Debug, Args)]
pub struct NetworkArgs {
    /// nat: the internet only (never the host, other sandboxes, private or link-local
    /// ranges); none: nothing out (forwards from the host still work).
    #[arg(long, value_enum, default_value_t = NetworkModeArg::Nat)]
    pub network: NetworkModeArg,
    /// Allow only these names (and --allow-cidr ranges); `*.example.com` for subdomains.
    /// Checked on each connection: TLS SNI or HTTP Host, and the address it resolved to.
    #[arg(long = "allow-domain", value_name = "NAME")]
    pub allow_domains: Vec<String>,
    /// Allow only these ranges (and --allow-domain names), e.g. 203.0.113.0/24.
    #[arg(long = "allow-cidr", value_name = "CIDR")]
    pub allow_cidrs: Vec<String>,
    /// Let the guest reach the host's 127.0.0.1:PORT, at 10.0.2.2:PORT (host.smolvm.internal).
    #[arg(long = "allow-host-port", value_name = "PORT")]
    pub allow_host_ports: Vec<u16>,
    /// Let --allow-cidr ranges admit the private ranges they cover (RFC 1918, 100.64/10,
    /// fc00::/7): a LAN service. Link-local (metadata services) stays refused.
    #[arg(long = "allow-private")]
    pub allow_private: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelArg {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NetworkModeArg {
    Nat,
    None,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Sandbox name (default: a generated sbx-xxxxxx).
    #[arg(long)]
    pub name: Option<String>,
    /// Memory in MiB [default: 512; with --from-snapshot, the snapshot's].
    #[arg(long)]
    pub memory: Option<u32>,
    /// Virtual CPUs [default: 1; with --from-snapshot, the snapshot's].
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Writable disk space in MiB (the base image is shared and read-only) [default: 2048;
    /// with --from-snapshot, the snapshot's].
    #[arg(long = "disk-size")]
    pub disk_size: Option<u64>,
    /// A ceiling on the sandbox's disk I/O in MiB/s, reads and writes of all its disks
    /// together (QEMU's block throttling) [default: none].
    #[arg(long = "disk-mbps", value_name = "MIB_S", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub disk_mbps: Option<u64>,
    /// A ceiling on the sandbox's disk operations per second, all its disks together
    /// [default: none].
    #[arg(long = "disk-iops", value_name = "IOPS", value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub disk_iops: Option<u64>,
    /// Continue from this snapshot (smolvm snapshot NAME --name SNAP) instead of booting.
    #[arg(long = "from-snapshot", value_name = "SNAP")]
    pub from_snapshot: Option<String>,
    /// Boot the kernel, even where the boot snapshot of this configuration could be restored.
    #[arg(long)]
    pub cold: bool,
    #[command(flatten)]
    pub net: NetworkArgs,
    /// auto: KVM where it works, else TCG (software emulation, slower).
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
    /// Seconds to wait for the guest to become ready.
    #[arg(long, default_value_t = smolvm::sandbox::DEFAULT_READY_TIMEOUT.as_secs())]
    pub timeout: u64,
    /// Stack a preset's tooling layer over the base (codex, claude-code, hermes, pi).
    #[arg(long)]
    pub preset: Option<String>,
    /// A secret that stays on the host: NAME@HOST[,HOST...] takes the value of this shell's
    /// NAME (or NAME@HOST=@FILE, NAME@HOST=@- for stdin). The guest's NAME is a placeholder;
    /// smolvm puts the value into requests to those hosts (HTTPS), in the header it belongs in
    /// (Authorization: Bearer, x-api-key, api-key; or NAME@HOST:header=H[:SCHEME]) and nowhere
    /// else: a request with the placeholder anywhere else is refused.
    #[arg(long = "secret", value_name = "NAME@HOST")]
    pub secrets: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum PresetCommand {
    /// Boot a sandbox with the tool ready, hand it the API keys set on the host, and open it.
    Start(PresetStartArgs),
}

#[derive(Debug, Args)]
pub struct PresetStartArgs {
    /// Create the sandbox and return, without opening the tool.
    #[arg(long)]
    pub no_attach: bool,
    #[command(flatten)]
    pub create: CreateArgs,
}

#[derive(Debug, Subcommand)]
pub enum PresetListCommand {
    /// Each preset, its layer's size and whether it is in the cache.
    List,
}

#[derive(Debug, Subcommand)]
pub enum EnvCommand {
    /// Set variables: `smolvm env set NAME KEY=VALUE...`; `KEY` alone reads its value from
    /// stdin, and `--from-env VAR` copies this shell's VAR (values need not be on the command
    /// line, where `ps` shows them).
    Set {
        name: String,
        vars: Vec<String>,
        /// Copy this variable (name and value) from the environment of this command.
        #[arg(long = "from-env", value_name = "VAR")]
        from_env: Vec<String>,
    },
    /// List the variables set on a sandbox.
    List { name: String },
    /// Remove variables.
    Unset {
        name: String,
        #[arg(required = true)]
        keys: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// The secrets of a sandbox: each name and the hosts its value goes to.
    List { name: String },
    /// Add or replace secrets: `smolvm secret set NAME VAR@HOST[,HOST...]` (the value of this
    /// shell's VAR; or VAR@HOST=@FILE, VAR@HOST=@- for stdin). A running sandbox uses it at once.
    Set {
        name: String,
        #[arg(required = true, value_name = "VAR@HOST")]
        specs: Vec<String>,
    },
    /// Remove secrets (the guest's variable goes too).
    Unset {
        name: String,
        #[arg(required = true)]
        vars: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build images from Debian's packages (needs root and the Debian mirror).
    #[command(subcommand)]
    Build(BuildCommand),
    /// Check a built release and write its pins to recipes/release.toml.
    Pin {
        /// The release directory, DIR/<tag> as written by `image build all`.
        release_dir: PathBuf,
        /// The pins file to rewrite (default: the checkout's recipes/release.toml).
        #[arg(long)]
        release_toml: Option<PathBuf>,
    },
    /// Show the release pinned in this binary: tag, URLs, sizes, SHA-256.
    Show,
    /// Download and verify the kernel and base rootfs into the cache (as create would).
    Pull {
        /// Also a preset's layer.
        #[arg(long)]
        preset: Option<String>,
    },
    /// List the verified images in the cache.
    List,
    /// Re-hash every cached image; bad ones are removed.
    Verify,
    /// Remove cached images no sandbox uses, and partial downloads.
    Prune,
    /// Load a locally built release (DIR/<tag>) into the cache after checking its SHA256SUMS.
    Import { release_dir: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum BuildCommand {
    /// The guest kernel: DIR/vmlinux-x86_64.elf (PVH) and DIR/vmlinux-x86_64.image (bzImage).
    Kernel {
        #[command(flatten)]
        common: BuildArgs,
    },
    /// The base rootfs: DIR/base-x86_64-rootfs.ext4.
    Base {
        #[command(flatten)]
        common: BuildArgs,
        /// Use this smolvm-init binary instead of building it (must be static).
        #[arg(long)]
        init: Option<PathBuf>,
        /// SOURCE_DATE_EPOCH for the image (default: the environment's, else the pinned tag's date).
        #[arg(long)]
        epoch: Option<i64>,
    },
    /// A preset's layer over the base: DIR/<preset>-x86_64-layer.ext4.
    Preset {
        /// codex, claude-code, hermes or pi.
        name: String,
        #[command(flatten)]
        common: BuildArgs,
    },
    /// Every asset of a release (kernels, base, every preset's layer), with manifest.json and
    /// SHA256SUMS, in DIR/<tag>/.
    All {
        #[command(flatten)]
        common: BuildArgs,
        /// Release tag, images-YYYY.MM.DD.N (default: the tag pinned in this binary).
        #[arg(long)]
        tag: Option<String>,
        /// Replace DIR/<tag> if it exists.
        #[arg(long)]
        force: bool,
        /// Leave the preset layers out (enough for `smolvm create`; builds much faster).
        #[arg(long)]
        no_presets: bool,
    },
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// The smolvm source checkout (default: found from the current directory).
    #[arg(long)]
    pub source: Option<PathBuf>,
    /// Build cache directory (default: /var/cache/smolvm/build as root).
    #[arg(long, env = "SMOLVM_BUILD_CACHE")]
    pub cache: Option<PathBuf>,
}

/// What the command line asked for: a built-in command, or `<preset> start`.
#[derive(Debug)]
pub enum Parsed {
    Main(Cli),
    Preset { preset: &'static Preset, verbose: u8, json: bool, command: PresetCommand },
}

/// The grammar: [`Cli`], plus one `<preset> start` subcommand per entry of the preset table.
pub fn command() -> clap::Command {
    let mut cmd = Cli::command();
    let names: Vec<String> = presets::PRESETS.iter().map(|p| format!("{} start", p.name)).collect();
    let help = cmd.get_after_help().map(|h| h.to_string()).unwrap_or_default();
    cmd = cmd.after_help(help.replace("{presets}", &names.join(" | ")));
    for p in presets::PRESETS {
        let keys: Vec<&str> = p.secrets.iter().map(|s| s.var).collect();
        let about = format!(
            "{} in a sandbox: `smolvm {} start` ({} from the host, as secrets: the guest sees placeholders)",
            p.about,
            p.name,
            keys.join(", ")
        );
        let sub = PresetCommand::augment_subcommands(clap::Command::new(p.name).about(about)).subcommand_required(true);
        cmd = cmd.subcommand(sub);
    }
    cmd
}

pub fn parse() -> Parsed {
    let m = command().get_matches();
    if let Some((name, sub)) = m.subcommand() {
        if let Some(preset) = presets::find(name) {
            let command = PresetCommand::from_arg_matches(sub).unwrap_or_else(|e| e.exit());
            return Parsed::Preset { preset, verbose: m.get_count("verbose"), json: m.get_flag("json"), command };
        }
    }
    Parsed::Main(Cli::from_arg_matches(&m).unwrap_or_else(|e| e.exit()))
}
