//! The binary: parse the command line, load the config, start logging, run.
//! Bad configuration is one line on stderr and exit code 64 (EX_USAGE).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use line_retry_proxy::admin_client;
use line_retry_proxy::app::{self, App, StartError};
use line_retry_proxy::config::{Config, ConfigError, ServeArgs};
use line_retry_proxy::demo::{self, DemoArgs};
use line_retry_proxy::edge::intercept::bundle;
use line_retry_proxy::edge::intercept::ca::{CaPlan, CertificateAuthority};
use line_retry_proxy::edge::intercept::ca_dir::PREVIOUS_CERT_FILE;
use line_retry_proxy::telemetry;

const EX_USAGE: u8 = 64;

#[derive(Parser)]
#[command(
    name = "line-retry-proxy",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default)
    Serve(ServeArgs),
    /// Print the intercept CA certificate (PEM) for bots to trust, creating it if absent;
    /// --bundle adds it to the system roots
    Ca(CaArgs),
    /// Check the configuration as serve would and print it as a config file (secrets masked)
    CheckConfig(ServeArgs),
    /// Exit 0 if the proxy on the admin address is ready (for container health checks)
    Healthcheck(AdminArgs),
    /// Print a table of the running proxy's metrics
    Stats(AdminArgs),
    /// Show, without a LINE account, what the proxy does for a bot that resends on errors
    Demo(DemoArgs),
}

#[derive(clap::Args)]
struct CaArgs {
    /// The proxy's TOML file: its ca-dir, intercept-hosts and ca-lifetime (flags and env win over it)
    #[arg(long, env = "LINE_RETRY_PROXY_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory of the intercept CA (ca.pem, ca.key) [default: ./ca]
    #[arg(long, env = "LINE_RETRY_PROXY_CA_DIR", value_name = "DIR")]
    ca_dir: Option<PathBuf>,
    /// Replace the CA with a new one; prints the new certificate, then the one it
    /// replaces (kept as ca-previous.pem): have bots trust both, then restart the proxy
    #[arg(long)]
    renew: bool,
    /// Print a trust bundle for bots instead: the system roots, then the proxy's CA
    /// (and the one it replaced, if kept). For REQUESTS_CA_BUNDLE and SSL_CERT_FILE,
    /// which replace a client's roots rather than add to them
    #[arg(long, conflicts_with = "renew")]
    bundle: bool,
    /// The system roots (PEM) that --bundle starts from [default: the distribution's
    /// bundle, e.g. /etc/ssl/certs/ca-certificates.crt]
    #[arg(long, value_name = "PEM", requires = "bundle")]
    system_roots: Option<PathBuf>,
    /// The only hosts a new CA may sign for (its name constraint), comma-separated [default: api.line.me]
    #[arg(long, env = "LINE_RETRY_PROXY_INTERCEPT_HOSTS", value_name = "HOSTS")]
    intercept_hosts: Option<String>,
    /// Lifetime of a new CA [default: 1year]
    #[arg(long, env = "LINE_RETRY_PROXY_CA_LIFETIME", value_name = "DUR")]
    ca_lifetime: Option<String>,
}

impl CaArgs {
    /// The CA directory and the plan for a new CA, resolved as `serve` resolves them:
    /// flag, then environment, then the config file, then the default.
    fn resolve(&self) -> Result<(PathBuf, CaPlan), ConfigError> {
        let config = Config::load(&ServeArgs {
            config: self.config.clone(),
            ca_dir: self.ca_dir.clone(),
            intercept_hosts: self.intercept_hosts.clone(),
            ca_lifetime: self.ca_lifetime.clone(),
            ..ServeArgs::default()
        })?;
        let plan = CaPlan {
            hosts: config.policy.intercept_hosts,
            lifetime: config.ca_lifetime,
        };
        Ok((config.ca_dir, plan))
    }
}

#[derive(clap::Args)]
struct AdminArgs {
    /// The proxy's admin listener
    #[arg(
        long,
        env = "LINE_RETRY_PROXY_ADMIN_LISTEN",
        value_name = "ADDR",
        default_value = "127.0.0.1:9090"
    )]
    admin_listen: std::net::SocketAddr,
}

fn main() -> ExitCode {
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|matches| Cli::from_arg_matches(&matches).map(|cli| (cli, matches)));
    let (cli, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(err) if !err.use_stderr() => {
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            let first = err.to_string();
            let first = first.lines().next().unwrap_or("invalid command line");
            eprintln!("line-retry-proxy: {}", first.trim_start_matches("error: "));
            return ExitCode::from(EX_USAGE);
        }
    };
    // A credential on the command line is readable by every user through `ps`.
    let serve_matches = matches.subcommand_matches("serve").unwrap_or(&matches);
    let auth_on_command_line =
        serve_matches.value_source("proxy_auth") == Some(ValueSource::CommandLine);
    let egress_on_command_line = serve_matches.value_source("upstream_proxy")
        == Some(ValueSource::CommandLine)
        && serve_matches
            .get_one::<String>("upstream_proxy")
            .is_some_and(|v| v.contains('@'));
    match cli.command {
        None => serve(cli.serve, auth_on_command_line, egress_on_command_line),
        Some(Command::Serve(args)) => serve(args, auth_on_command_line, egress_on_command_line),
        Some(Command::Ca(args)) => ca(&args),
        Some(Command::Demo(args)) => demo::main(&args),
        Some(Command::CheckConfig(args)) => check_config(&args),
        Some(Command::Healthcheck(args)) => {
            match admin_client::get(args.admin_listen, "/readyz", Duration::from_secs(3)) {
                Ok(_) => ExitCode::SUCCESS,
                Err(err) => fail(1, err),
            }
        }
        Some(Command::Stats(args)) => {
            match admin_client::get(args.admin_listen, "/metrics", Duration::from_secs(5)) {
                Ok(metrics) => {
                    print!("{}", admin_client::stats_table(&metrics));
                    ExitCode::SUCCESS
                }
                Err(err) => fail(1, err),
            }
        }
    }
}

fn ca(args: &CaArgs) -> ExitCode {
    let (dir, plan) = match args.resolve() {
        Ok(resolved) => resolved,
        Err(err) => return fail(EX_USAGE, err),
    };
    if args.renew {
        return match CertificateAuthority::renew(&dir, &plan) {
            Ok((ca, previous)) => {
                // Both, for the bots' trust store while they change over.
                print!("{}{}", ca.cert_pem(), previous.unwrap_or_default());
                eprintln!(
                    "line-retry-proxy: new intercept CA in {}; have bots trust the printed bundle, then restart the proxy",
                    dir.display()
                );
                ExitCode::SUCCESS
            }
            Err(err) => fail(EX_USAGE, format_args!("intercept CA: {err}")),
        };
    }
    let ca = match CertificateAuthority::load_or_create(&dir, &plan) {
        Ok(ca) => ca,
        Err(err) => return fail(EX_USAGE, format_args!("intercept CA: {err}")),
    };
    if !args.bundle {
        print!("{}", ca.cert_pem());
        return ExitCode::SUCCESS;
    }
    let (roots_path, roots) = match bundle::system_roots(args.system_roots.as_deref()) {
        Ok(found) => found,
        Err(err) => return fail(EX_USAGE, err),
    };
    if bundle::count(&roots) == 0 {
        return fail(
            EX_USAGE,
            format_args!(
                "system roots {}: no PEM certificate in it",
                roots_path.display()
            ),
        );
    }
    let previous = std::fs::read_to_string(dir.join(PREVIOUS_CERT_FILE)).unwrap_or_default();
    print!(
        "{}",
        bundle::bundle([roots.as_str(), ca.cert_pem(), previous.as_str()])
    );
    ExitCode::SUCCESS
}

/// The settings as `serve` would take them, checked as `serve` checks them at start
/// (files exist and parse, the CA directory is usable), printed as a config file.
fn check_config(args: &ServeArgs) -> ExitCode {
    let config = match Config::load(args) {
        Ok(config) => config,
        Err(err) => return fail(EX_USAGE, err),
    };
    if let Err(err) = app::check(&config) {
        return fail(EX_USAGE, err);
    }
    print!("{}", config.describe());
    ExitCode::SUCCESS
}

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    // The lines logged before it, then the reason.
    telemetry::flush();
    eprintln!("line-retry-proxy: {message}");
    ExitCode::from(code)
}

fn serve(args: ServeArgs, auth_on_command_line: bool, egress_on_command_line: bool) -> ExitCode {
    let config = match Config::load(&args) {
        Ok(config) => config,
        Err(err) => return fail(EX_USAGE, err),
    };
    // Held to the end: the log's last lines are written when it drops.
    let _log = telemetry::init(config.log_format);
    if egress_on_command_line {
        tracing::warn!("--upstream-proxy with a password on the command line is visible to every user of this machine (ps, /proc); set LINE_RETRY_PROXY_UPSTREAM_PROXY or upstream-proxy in the config file instead");
    }
    if auth_on_command_line {
        tracing::warn!("--proxy-auth on the command line is visible to every user of this machine (ps, /proc); set LINE_RETRY_PROXY_PROXY_AUTH or proxy-auth in the config file instead");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => return fail(1, format_args!("cannot start the runtime: {err}")),
    };
    runtime.block_on(async move {
        let app = match App::new(config) {
            Ok(app) => app,
            Err(err) => return fail(EX_USAGE, err),
        };
        let (listener, admin) = match app::bind(&app.config).await {
            Ok(bound) => bound,
            Err(err @ StartError::Bind { .. }) => return fail(1, err),
            Err(err) => return fail(EX_USAGE, err),
        };
        let addr =
            |l: &tokio::net::TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(
            listen = %addr(&listener),
            admin = %addr(&admin),
            upstream = %app.config.upstream,
            ca_dir = %app.config.ca_dir.display(),
            "line-retry-proxy ready"
        );
        tokio::spawn(reload_on_sighup(app.clone()));
        app::run(app, listener, admin, shutdown_signal()).await;
        ExitCode::SUCCESS
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            tracing::warn!(error = %err, "cannot watch SIGTERM; only SIGINT stops the proxy");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

/// SIGHUP re-reads the file (flags and env stay as given) and swaps in what can
/// change safely: retry policy, windows, per-endpoint switches, host lists.
async fn reload_on_sighup(app: Arc<App>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        match Config::load(&app.config.args) {
            Ok(next) => {
                let restart_needed = app.config.changed_until_restart(&next);
                if let Some(host) = next
                    .policy
                    .intercept_hosts
                    .iter()
                    .find(|h| !app.edge.leaves.ca().permits(h))
                {
                    tracing::warn!(%host, "the intercept CA may not sign for this host (name constraints): bots will refuse its leaves; renew the CA with `line-retry-proxy ca --renew`");
                }
                app.reload(next.policy);
                tracing::info!("configuration reloaded: retry policy, windows and host lists");
                if !restart_needed.is_empty() {
                    tracing::warn!("not applied until restart: {}", restart_needed.join(", "));
                }
            }
            Err(err) => tracing::error!("reload failed, keeping the current settings: {err}"),
        }
    }
}
