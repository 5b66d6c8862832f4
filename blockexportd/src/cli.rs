//! qemu-storage-daemon's command line, plus a short form for newcomers.
//!
//! Options take effect in the order they are given, as in QSD; this module only splits the
//! command line into that ordered list and parses each option's keyval (or JSON) argument.

use qsd_qapi::keyval;
use serde_json::{Map, Value};
use std::path::PathBuf;

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    /// `-h`, `--help`: print the usage and exit.
    Help,
    /// `-V`, `--version`: print the version and exit.
    Version,
    /// Run the daemon with these options, in order.
    Run(RunOptions),
}

/// The options of a daemon run.
#[derive(Debug, Default, PartialEq)]
pub struct RunOptions {
    /// The QSD-style options, in command-line order.
    pub items: Vec<Item>,
    /// `--pidfile PATH`.
    pub pidfile: Option<PathBuf>,
    /// `--daemonize`.
    pub daemonize: bool,
    /// The short form: `blockexportd IMAGE`.
    pub quick: Option<QuickExport>,
    /// Warnings about the options, for the operator (QemuOpts' "warning: short-form boolean
    /// option 'x' deprecated", named by option: `--chardev TEXT: warning: ...`).
    pub warnings: Vec<String>,
}

/// One QSD-style option, with its original text for error messages.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// Which option.
    pub kind: ItemKind,
    /// The argument as given (for messages such as `--blockdev driver=file: ...`).
    pub text: String,
    /// The parsed argument.
    pub args: Map<String, Value>,
    /// Whether `args` came from keyval syntax (scalars are strings) rather than JSON.
    pub keyval: bool,
}

/// The option an [`Item`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemKind {
    /// `--blockdev`
    Blockdev,
    /// `--object`
    Object,
    /// `--chardev`
    Chardev,
    /// `--monitor`
    Monitor,
    /// `--nbd-server`
    NbdServer,
    /// `--export`
    Export,
}

impl ItemKind {
    /// The option's name, with its dashes.
    pub fn option(self) -> &'static str {
        match self {
            ItemKind::Blockdev => "--blockdev",
            ItemKind::Object => "--object",
            ItemKind::Chardev => "--chardev",
            ItemKind::Monitor => "--monitor",
            ItemKind::NbdServer => "--nbd-server",
            ItemKind::Export => "--export",
        }
    }

    fn implied_key(self) -> Option<&'static str> {
        match self {
            ItemKind::Blockdev => Some("driver"),
            ItemKind::Object => Some("qom-type"),
            ItemKind::Chardev => Some("backend"),
            ItemKind::Monitor => Some("chardev"),
            ItemKind::NbdServer => None,
            ItemKind::Export => Some("type"),
        }
    }

    /// `--chardev` keeps QEMU's older QemuOpts syntax; every other option is keyval or JSON.
    fn accepts_json(self) -> bool {
        !matches!(self, ItemKind::Chardev)
    }
}

/// The short form: export one image over NBD and print its URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuickExport {
    /// The image file (raw or qcow2, probed).
    pub image: PathBuf,
    /// `--writable`.
    pub writable: bool,
    /// `--port N` (default 10809), on 127.0.0.1.
    pub port: u16,
    /// `--socket PATH`: a unix socket instead of TCP.
    pub socket: Option<PathBuf>,
    /// `--vhost-user-blk PATH`: a vhost-user-blk export on the unix socket PATH instead of
    /// NBD.
    pub vhost_user_blk: Option<PathBuf>,
}

/// A command-line error; printed as `blockexportd: MESSAGE`.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// An option this program does not know.
    #[error("unrecognized option '{0}'")]
    Unrecognized(String),
    /// An option that needs an argument was last.
    #[error("option '{0}' requires an argument")]
    MissingArgument(String),
    /// An option's argument did not parse.
    #[error("{option} {text}: {source}")]
    Keyval {
        /// The option.
        option: &'static str,
        /// Its argument.
        text: String,
        /// What is wrong with it.
        #[source]
        source: keyval::KeyvalError,
    },
    /// A bad value for a short-form option.
    #[error("{0}")]
    Invalid(String),
}

/// The usage text of `--help`.
pub const USAGE: &str = "\
Usage: blockexportd [options]
       blockexportd IMAGE [--writable] [--port PORT | --socket PATH]
       blockexportd --vhost-user-blk SOCKET IMAGE [--writable]
blockexportd: export disk images over NBD and FUSE, managed over QMP

  -h, --help             display this help and exit
  -V, --version          output version information and exit

  IMAGE                  export IMAGE (raw or qcow2, probed) over NBD on
                         127.0.0.1:10809, read-only, print its URI and run
                         until interrupted
  --writable             with IMAGE: export it writable
  --port PORT            with IMAGE: listen on 127.0.0.1:PORT
  --socket PATH          with IMAGE: listen on the unix socket PATH
  --vhost-user-blk SOCKET
                         with IMAGE: export it over vhost-user-blk on the unix socket
                         SOCKET (a VM's virtio-blk disk) instead of NBD

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]
                         configure a block backend (file, raw, qcow2, null-co)

  --chardev socket,id=<id>,path=<path>[,server=on][,wait=off]
  --chardev socket,id=<id>,host=<host>,port=<port>[,server=on][,wait=off]
  --chardev socket,id=<id>,path=<path>[,reconnect-ms=<ms>|,reconnect=<s>]
  --chardev socket,id=<id>,host=<host>,port=<port>[,reconnect-ms=<ms>]
  --chardev stdio,id=<id>
  --chardev pipe,id=<id>,path=<path>
                         configure a character device backend for a monitor
                         (without server=on: connect to a listening peer;
                         pipe: read <path>.in and write <path>.out, FIFOs, or
                         <path> itself both ways if either cannot be opened)

  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmap=<name>]
                         export the specified block node over NBD
                         (requires --nbd-server)

  --export [type=]fuse,id=<id>,node-name=<node-name>,mountpoint=<file>
           [,growable=on|off][,writable=on|off][,allow-other=on|off|auto]
                         export the specified block node over FUSE

  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                         configure a QMP monitor

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
               [,handshake-max-seconds=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
                         start an NBD server for exporting block nodes

  --object iothread,id=<id>
                         create a new object (iothread)

  --pidfile <path>       write process ID to a file after startup
";

/// Parses the arguments (without the program name).
pub fn parse<I, S>(args: I) -> Result<Command, CliError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let args: Vec<String> = args.into_iter().map(Into::into).collect();
    let mut run = RunOptions::default();
    let mut image: Option<PathBuf> = None;
    let mut writable = false;
    let mut port: Option<u16> = None;
    let mut socket: Option<PathBuf> = None;
    let mut vhost_user_blk: Option<PathBuf> = None;
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        // `--opt=value` and `--opt value` are both accepted, as getopt_long does.
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, CliError> {
            if let Some(v) = inline.clone() {
                return Ok(v);
            }
            let v = args
                .get(i)
                .cloned()
                .ok_or_else(|| CliError::MissingArgument(name.to_string()))?;
            i += 1;
            Ok(v)
        };
        let kind = match name.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--blockdev" => Some(ItemKind::Blockdev),
            "--object" => Some(ItemKind::Object),
            "--chardev" => Some(ItemKind::Chardev),
            "--monitor" => Some(ItemKind::Monitor),
            "--nbd-server" => Some(ItemKind::NbdServer),
            "--export" => Some(ItemKind::Export),
            "--pidfile" => {
                run.pidfile = Some(PathBuf::from(value("--pidfile")?));
                None
            }
            "--daemonize" => {
                run.daemonize = true;
                None
            }
            "--writable" => {
                writable = true;
                None
            }
            "--port" => {
                let v = value("--port")?;
                port =
                    Some(v.parse().map_err(|_| {
                        CliError::Invalid(format!("--port {v}: not a port number"))
                    })?);
                None
            }
            "--socket" => {
                socket = Some(PathBuf::from(value("--socket")?));
                None
            }
            "--vhost-user-blk" => {
                vhost_user_blk = Some(PathBuf::from(value("--vhost-user-blk")?));
                None
            }
            _ if !arg.starts_with('-') && image.is_none() => {
                image = Some(PathBuf::from(arg));
                None
            }
            _ => return Err(CliError::Unrecognized(arg.clone())),
        };
        if let Some(kind) = kind {
            let text = value(kind.option())?;
            let (args, keyval) = parse_item(kind, &text, &mut run.warnings)?;
            run.items.push(Item {
                kind,
                text,
                args,
                keyval,
            });
        }
    }
    match image {
        Some(image) => {
            if port.is_some() && socket.is_some() {
                return Err(CliError::Invalid(
                    "--port and --socket cannot be used together".into(),
                ));
            }
            if vhost_user_blk.is_some() && (port.is_some() || socket.is_some()) {
                return Err(CliError::Invalid(
                    "--vhost-user-blk cannot be used with --port or --socket".into(),
                ));
            }
            run.quick = Some(QuickExport {
                image,
                writable,
                port: port.unwrap_or(10809),
                socket,
                vhost_user_blk,
            });
        }
        None => {
            for (set, name) in [
                (writable, "--writable"),
                (port.is_some(), "--port"),
                (socket.is_some(), "--socket"),
                (vhost_user_blk.is_some(), "--vhost-user-blk"),
            ] {
                if set {
                    return Err(CliError::Invalid(format!(
                        "{name} needs an IMAGE to export"
                    )));
                }
            }
        }
    }
    Ok(Command::Run(run))
}

fn parse_item(
    kind: ItemKind,
    text: &str,
    warnings: &mut Vec<String>,
) -> Result<(Map<String, Value>, bool), CliError> {
    let err = |source| CliError::Keyval {
        option: kind.option(),
        text: text.to_string(),
        source,
    };
    if !kind.accepts_json() {
        let opts = keyval::parse_opts(text, kind.implied_key()).map_err(err)?;
        for warning in &opts.warnings {
            warnings.push(format!("{} {text}: warning: {warning}", kind.option()));
        }
        return Ok((opts.values, true));
    }
    let keyval = !text.starts_with('{');
    let parsed = if keyval {
        keyval::parse(text, kind.implied_key())
    } else {
        keyval::parse_json_or_keyval(text, kind.implied_key())
    };
    parsed.map(|m| (m, keyval)).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(args: &[&str]) -> RunOptions {
        match parse(args.iter().copied()) {
            Ok(Command::Run(r)) => r,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn short_form_booleans_come_back_as_warnings_named_by_option() {
        let r = run(&["--chardev", "socket,id=c,path=/s,server,wait=off"]);
        assert_eq!(
            r.warnings,
            [
                "--chardev socket,id=c,path=/s,server,wait=off: warning: short-form boolean \
              option 'server' deprecated\nPlease use server=on instead"
            ]
        );
        assert_eq!(r.items[0].args["server"], "on");
        assert!(run(&["--chardev", "socket,id=c,path=/s,server=on"])
            .warnings
            .is_empty());
    }

    #[test]
    fn options_keep_their_order() {
        let r = run(&[
            "--blockdev",
            "driver=file,filename=a.img,node-name=f",
            "--nbd-server",
            "addr.type=unix,addr.path=/tmp/s",
            "--export=type=nbd,id=e,node-name=f",
            "--pidfile",
            "/tmp/pid",
        ]);
        let kinds: Vec<_> = r.items.iter().map(|i| i.kind).collect();
        assert_eq!(
            kinds,
            [ItemKind::Blockdev, ItemKind::NbdServer, ItemKind::Export]
        );
        assert_eq!(
            r.items[1].args["addr"],
            json!({"type": "unix", "path": "/tmp/s"})
        );
        assert_eq!(r.pidfile, Some(PathBuf::from("/tmp/pid")));
    }

    #[test]
    fn implied_keys() {
        let r = run(&[
            "--object",
            "iothread,id=io0",
            "--monitor",
            "mon0",
            "--export",
            "nbd,id=e",
        ]);
        assert_eq!(r.items[0].args["qom-type"], "iothread");
        assert_eq!(r.items[1].args["chardev"], "mon0");
        assert_eq!(r.items[2].args["type"], "nbd");
    }

    #[test]
    fn json_form() {
        let r = run(&["--blockdev", r#"{"driver": "null-co", "size": 4096}"#]);
        assert!(!r.items[0].keyval);
        assert_eq!(r.items[0].args["size"], 4096);
    }

    #[test]
    fn errors_name_the_option() {
        assert!(matches!(parse(["--bogus"]), Err(CliError::Unrecognized(o)) if o == "--bogus"));
        assert!(
            matches!(parse(["--blockdev"]), Err(CliError::MissingArgument(o)) if o == "--blockdev")
        );
        assert!(matches!(parse(["--port", "1"]), Err(CliError::Invalid(_))));
        assert!(matches!(
            parse(["a.img", "b.img"]),
            Err(CliError::Unrecognized(_))
        ));
    }

    #[test]
    fn quick_form() {
        let r = run(&["disk.qcow2", "--writable", "--port", "10810"]);
        assert_eq!(
            r.quick,
            Some(QuickExport {
                image: "disk.qcow2".into(),
                writable: true,
                port: 10810,
                socket: None,
                vhost_user_blk: None,
            })
        );
        let r = run(&["--vhost-user-blk", "/tmp/vub.sock", "disk.img"]);
        assert_eq!(
            r.quick.and_then(|q| q.vhost_user_blk),
            Some("/tmp/vub.sock".into())
        );
        assert!(matches!(
            parse(["--vhost-user-blk", "/tmp/s", "d.img", "--port", "1"]),
            Err(CliError::Invalid(_))
        ));
        assert!(matches!(
            parse(["--vhost-user-blk", "/tmp/s"]),
            Err(CliError::Invalid(_))
        ));
        assert!(matches!(parse(["-V"]), Ok(Command::Version)));
        assert!(matches!(parse(["x", "--help"]), Ok(Command::Help)));
    }
}
