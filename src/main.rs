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
use line_retry_proxy::config::{Config, ServeArgs};
use line_retry_proxy::demo::{self, DemoArgs};
use line_retry_proxy::edge::intercept::ca::{CaPlan, CertificateAuthority};
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
    /// Print the intercept CA certificate (PEM) for bots to trust, creating it if absent
    Ca(CaArgs),
    /// Validate the configuration and print the effective settings (secrets masked)
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
    #[arg(
        long,
        env = "LINE_RETRY_PROXY_CA_DIR",
        value_name = "DIR",
        default_value = "ca"
    )]
    ca_dir: PathBuf,
    /// Replace the CA with a new one; prints the new certificate, then the one it
    /// replaces (kept as ca-previous.pem): have bots trust both, then restart the proxy
    #[arg(long)]
    renew: bool,
    /// The only hosts a new CA may sign for (its name constraint), comma-separated
    #[arg(
        long,
        env = "LINE_RETRY_PROXY_INTERCEPT_HOSTS",
        value_name = "HOSTS",
        default_value = "api.line.me"
    )]
    intercept_hosts: String,
    /// Lifetime of a new CA
    #[arg(
        long,
        env = "LINE_RETRY_PROXY_CA_LIFETIME",
        value_name = "DUR",
        default_value = "1year"
    )]
    ca_lifetime: String,
}

impl CaArgs {
    fn plan(&self) -> Result<CaPlan, String> {
        let lifetime = humantime::parse_duration(self.ca_lifetime.trim())
            .ok()
            .filter(|d| (Duration::from_secs(86_400)..=Duration::from_secs(315_576_000)).contains(d))
            .ok_or_else(|| {
                format!(
                    "invalid value {:?} for option `ca-lifetime`: expected a duration from 1day to 10years",
                    self.ca_lifetime
                )
            })?;
        let hosts = self
            .intercept_hosts
            .split(',')
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        Ok(CaPlan { hosts, lifetime })
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
    match cli.command {
        None => serve(cli.serve, auth_on_command_line),
        Some(Command::Serve(args)) => serve(args, auth_on_command_line),
        Some(Command::Ca(args)) => ca(&args),
        Some(Command::Demo(args)) => demo::main(&args),
        Some(Command::CheckConfig(args)) => match Config::load(&args) {
            Ok(config) => {
                print!("{}", config.describe());
                ExitCode::SUCCESS
            }
            Err(err) => fail(EX_USAGE, err),
        },
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
    let plan = match args.plan() {
        Ok(plan) => plan,
        Err(err) => return fail(EX_USAGE, err),
    };
    if !args.renew {
        return match CertificateAuthority::load_or_create(&args.ca_dir, &plan) {
            Ok(ca) => {
                print!("{}", ca.cert_pem());
                ExitCode::SUCCESS
            }
            Err(err) => fail(EX_USAGE, format_args!("intercept CA: {err}")),
        };
    }
    match CertificateAuthority::renew(&args.ca_dir, &plan) {
        Ok((ca, previous)) => {
            // Both, for the bots' trust store while they change over.
            print!("{}{}", ca.cert_pem(), previous.unwrap_or_default());
            eprintln!(
                "line-retry-proxy: new intercept CA in {}; have bots trust the printed bundle, then restart the proxy",
                args.ca_dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(err) => fail(EX_USAGE, format_args!("intercept CA: {err}")),
    }
}

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("line-retry-proxy: {message}");
    ExitCode::from(code)
}

fn serve(args: ServeArgs, auth_on_command_line: bool) -> ExitCode {
    let config = match Config::load(&args) {
        Ok(config) => config,
        Err(err) => return fail(EX_USAGE, err),
    };
    telemetry::init(config.log_format);
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
                let restart_needed = next.listen != app.config.listen
                    || next.admin_listen != app.config.admin_listen
                    || next.upstream.to_string() != app.config.upstream.to_string()
                    || next.ca_dir != app.config.ca_dir
                    || next.store != app.config.store
                    || next.store_timeout != app.config.store_timeout
                    || next.store_ca != app.config.store_ca
                    || next.canonical_json != app.config.canonical_json
                    || next.body_limit != app.config.body_limit
                    || next.proxy_auth != app.config.proxy_auth;
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
                if restart_needed {
                    tracing::warn!("some changed settings (listeners, upstream, store, CA, body limit, auth, canonical-json) take effect only after a restart");
                }
            }
            Err(err) => tracing::error!("reload failed, keeping the current settings: {err}"),
        }
    }
}
