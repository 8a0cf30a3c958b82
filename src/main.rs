//! The `lameduck` binary: parses the command line, sets up logging and the runtime,
//! dispatches, and maps failures to exit codes (2: bad usage or cannot start; 1: failed).

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;
use lameduck::cli::{
    Cli, Command, DrainArgs, InjectArgs, LogFormat, LogLevel, ProxyArgs, WebhookArgs,
};
use lameduck::sidecar::Bound;
use tracing::level_filters::LevelFilter;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    match cli.command {
        Command::Proxy(args) => proxy(args),
        Command::Drain(args) => drain(args),
        Command::Inject(args) => inject(args),
        Command::Webhook(args) => webhook(args),
    }
}

/// Help and version go to stdout with exit 0. Any other parse error is clap's whole
/// message (what is wrong, the accepted values, the usage line) on stderr, exit 2; bare
/// `lameduck` prints the help there too.
fn usage_error(e: clap::Error) -> ExitCode {
    let _ = e.print();
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::SUCCESS,
        _ => ExitCode::from(2),
    }
}

/// One line on stderr (a failed write is ignored, never a panic) and the exit code.
fn fail(code: u8, msg: &str) -> ExitCode {
    lameduck::logging::eprint_line(&format!("lameduck: {msg}"));
    ExitCode::from(code)
}

fn proxy(args: ProxyArgs) -> ExitCode {
    if let Err(e) = args.validate() {
        return fail(2, &e.to_string());
    }
    init_tracing(args.log_format, args.log_level);
    let runtime = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads.into())
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => return fail(1, &format!("cannot start the runtime: {e}")),
    };
    let code = runtime.block_on(async move {
        let bound = match Bound::bind(args).await {
            Ok(bound) => bound,
            Err(e) => return fail(2, &e.to_string()),
        };
        match lameduck::lifecycle::signal::listen() {
            Ok(terminations) => ExitCode::from(bound.run(terminations).await),
            Err(e) => fail(1, &format!("cannot register signal handlers: {e}")),
        }
    });
    lameduck::logging::flush(LOG_FLUSH);
    code
}

/// How long the exit waits for queued log lines to reach stderr (a blocked stderr does not
/// hold the exit longer).
const LOG_FLUSH: std::time::Duration = std::time::Duration::from_secs(1);

fn drain(args: DrainArgs) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime starts");
    let result = runtime.block_on(lameduck::admin::request_drain(
        args.admin,
        !args.no_wait,
        args.token.as_deref(),
    ));
    match result {
        Ok(body) => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, &e.to_string()),
    }
}

/// Reads manifests, writes them injected to stdout, warnings to stderr; a document that
/// cannot be injected exits 2 naming it.
fn inject(args: InjectArgs) -> ExitCode {
    use std::io::{Read, Write};
    let settings = lameduck::kube::inject::Settings::from(&args.sidecar);
    if let Err(e) = settings.check() {
        return fail(2, &e.to_string());
    }
    let mut input = String::new();
    let read = if args.filename.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut input)
    } else {
        std::fs::File::open(&args.filename).and_then(|mut f| f.read_to_string(&mut input))
    };
    if let Err(e) = read {
        return fail(2, &format!("cannot read {}: {e}", args.filename.display()));
    }
    match lameduck::kube::inject::inject_manifests(&input, &settings, args.all) {
        Ok(out) => {
            for w in &out.warnings {
                lameduck::logging::eprint_line(&format!("lameduck: warning: {w}"));
            }
            let mut stdout = std::io::stdout().lock();
            match stdout
                .write_all(out.yaml.as_bytes())
                .and_then(|_| stdout.flush())
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(1, &format!("cannot write the output: {e}")),
            }
        }
        Err(e) => fail(2, &e.to_string()),
    }
}

fn webhook(args: WebhookArgs) -> ExitCode {
    if let Err(e) = lameduck::kube::inject::Settings::from(&args.sidecar).check() {
        return fail(2, &e.to_string());
    }
    init_tracing(args.log_format, args.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(1, &format!("cannot start the runtime: {e}")),
    };
    let code = runtime.block_on(async move {
        let bound = match lameduck::kube::webhook::Bound::bind(&args).await {
            Ok(bound) => bound,
            Err(e) => return fail(2, &e.to_string()),
        };
        let mut terminations = match lameduck::lifecycle::signal::listen() {
            Ok(t) => t,
            Err(e) => return fail(1, &format!("cannot register signal handlers: {e}")),
        };
        tracing::info!(addr = %bound.local_addr(), "webhook listening");
        bound
            .run(async move {
                let _ = terminations.recv().await;
            })
            .await;
        ExitCode::SUCCESS
    });
    lameduck::logging::flush(LOG_FLUSH);
    code
}

fn init_tracing(format: LogFormat, level: LogLevel) {
    let level = match level {
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Trace => LevelFilter::TRACE,
    };
    // Through the log queue, with the fmt layer's own error report (an `eprintln!` that
    // panics when stderr fails) off: see `lameduck::logging`.
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(lameduck::logging::Stderr)
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
