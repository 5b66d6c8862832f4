//! blockexportd: export disk images over NBD and FUSE, with qemu-storage-daemon's command line.

use blockexportd::cli::{self, Command};
use blockexportd::{commands, daemon::Daemon, memory, process, run};
use std::process::ExitCode;

fn main() -> ExitCode {
    let opts = match cli::parse(std::env::args().skip(1)) {
        Ok(Command::Help) => {
            print!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("blockexportd {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Ok(Command::Run(opts)) => {
            for warning in &opts.warnings {
                eprintln!("blockexportd: {warning}");
            }
            opts
        }
        Err(e) => {
            eprintln!("blockexportd: {e}");
            return ExitCode::FAILURE;
        }
    };
    blockexportd::logging::init();
    let notifier = if opts.daemonize {
        match process::daemonize() {
            Ok(n) => Some(n),
            Err(e) => {
                eprintln!("blockexportd: --daemonize: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    process::raise_fd_limit();
    memory::tune_allocator();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("blockexportd")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("blockexportd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        let daemon = Daemon::new(
            qmp_server::QmpServer::new(run::qmp_version()),
            tokio::runtime::Handle::current(),
        );
        commands::register(&daemon);
        memory::spawn_trimmer();
        let started = run::startup(&daemon, &opts).await;
        let pidfile = match (&started, &opts.pidfile) {
            (Ok(()), Some(path)) => match process::Pidfile::create(path) {
                Ok(p) => Some(p),
                Err(e) => {
                    eprintln!(
                        "blockexportd: cannot create PID file: {}: {e}",
                        path.display()
                    );
                    daemon.shutdown().await;
                    if let Some(n) = notifier {
                        n.failure();
                    }
                    return ExitCode::FAILURE;
                }
            },
            _ => None,
        };
        if let Err(e) = started {
            eprintln!("blockexportd: {e}");
            daemon.shutdown().await;
            if let Some(n) = notifier {
                n.failure();
            }
            return ExitCode::FAILURE;
        }
        if let Some(n) = notifier {
            n.success();
        }
        run::wait_for_shutdown(&daemon).await;
        daemon.shutdown().await;
        drop(pidfile);
        ExitCode::SUCCESS
    });
    // Everything was flushed and closed above; a stdio monitor may still be blocked reading
    // standard input, which must not keep the process alive.
    runtime.shutdown_background();
    code
}
