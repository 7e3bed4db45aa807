//! Who a local replica runs as. When faastastic runs as root, each function's processes run
//! under a user and group of their own, taken from `local.uid_range`, with no supplementary
//! groups and `no_new_privs` set; its files (working directory, secrets) live outside the
//! data directory, in a tree only traversable by others, owned by that user and readable by
//! it alone. A function then cannot read faastastic's data directory, credentials or another
//! function's files, nor read the environment of, or signal, faastastic's processes or
//! another function's.
//!
//! A user is held by an exclusive lock on `<function_dir>/users/<uid>.lock` for as long as
//! any generation of its function exists, so two faastastic processes on one machine (or two
//! datacenters of one process) never hand out the same user; users are handed out in order
//! and not again by this process until the range wraps, and any process still running as a
//! user when it is handed out (one a removed function, or a previous run, left behind) is
//! killed first, so it never meets the next function's files.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The default range of users handed to functions: above the ranges systemd sets aside for
/// accounts, dynamic users and containers (524288-1879048191), below 2^31.
pub const DEFAULT_UID_RANGE: (u32, u32) = (1_900_000_000, 1_900_099_999);

/// How a platform's replicas are isolated.
pub enum Isolation {
    /// As faastastic's own user (not root, or `local.function_users = false`).
    ServerUser,
    /// A user per function, and function files under `files`; each replica in a sandbox
    /// when there is one.
    FunctionUsers {
        users: Users,
        files: PathBuf,
        sandbox: Option<Bubblewrap>,
    },
}

/// `local.sandbox`: whether replicas run in a bubblewrap sandbox (with a user per function).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxMode {
    /// Where bubblewrap is installed and works here; else none, said at start.
    Auto,
    /// Always: faastastic does not start without it.
    Bubblewrap,
    None,
}

impl std::str::FromStr for SandboxMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(SandboxMode::Auto),
            "bubblewrap" => Ok(SandboxMode::Bubblewrap),
            "none" => Ok(SandboxMode::None),
            other => Err(format!(
                "{other:?} is not \"auto\", \"bubblewrap\" or \"none\""
            )),
        }
    }
}

/// Where a sandboxed function finds its secrets, as on OpenFaaS.
pub const SECRETS_PATH: &str = "/var/openfaas/secrets";

/// A replica's sandbox, made by bubblewrap: the machine's filesystem read-only, a private
/// `/tmp` and `/var/tmp`, its own generation directory the only writable place, every other
/// function's files hidden, its secrets at `/var/openfaas/secrets`, and its own PID and IPC
/// namespaces (it sees and signals its own processes only).
#[derive(Debug)]
pub struct Bubblewrap {
    program: PathBuf,
    /// What every replica's sandbox starts with.
    base: Vec<std::ffi::OsString>,
}

impl Bubblewrap {
    fn new(program: PathBuf, files: &Path) -> Bubblewrap {
        let mut base: Vec<std::ffi::OsString> = Vec::new();
        let mut add =
            |args: &[&std::ffi::OsStr]| base.extend(args.iter().map(|a| a.to_os_string()));
        let os = |s: &'static str| std::ffi::OsStr::new(s);
        add(&[os("--ro-bind"), os("/"), os("/")]);
        add(&[os("--dev"), os("/dev"), os("--proc"), os("/proc")]);
        add(&[os("--tmpfs"), os("/tmp")]);
        // /var again, so that /var/openfaas can be made in it: its entries bound back.
        add(&[os("--tmpfs"), os("/var")]);
        if let Ok(entries) = std::fs::read_dir("/var") {
            for entry in entries.flatten() {
                let path = entry.path();
                if path == Path::new("/var/tmp") || path == Path::new("/var/openfaas") {
                    continue;
                }
                match std::fs::read_link(&path) {
                    Ok(target) => add(&[os("--symlink"), target.as_os_str(), path.as_os_str()]),
                    Err(_) => add(&[os("--ro-bind"), path.as_os_str(), path.as_os_str()]),
                }
            }
        }
        add(&[
            os("--tmpfs"),
            os("/var/tmp"),
            os("--dir"),
            os("/var/openfaas"),
        ]);
        // Every function's files out of sight; the replica's own directory is bound back.
        add(&[os("--tmpfs"), files.as_os_str()]);
        add(&[
            os("--unshare-pid"),
            os("--unshare-ipc"),
            os("--die-with-parent"),
        ]);
        add(&[os("--new-session")]);
        Bubblewrap { program, base }
    }

    /// The program and arguments that run `exe ARGS` in a sandbox for the generation in
    /// `dir` (its working directory; its secrets in `dir/secrets`).
    pub fn command(
        &self,
        dir: &Path,
        exe: &Path,
        args: &[&str],
    ) -> (&Path, Vec<std::ffi::OsString>) {
        let mut out = self.base.clone();
        let secrets = dir.join("secrets");
        // The program too, for when it is a copy among the functions' files.
        for (flag, from, to) in [
            ("--bind", dir, dir),
            ("--ro-bind", secrets.as_path(), Path::new(SECRETS_PATH)),
            ("--ro-bind", exe, exe),
        ] {
            out.extend([flag.into(), from.as_os_str().into(), to.as_os_str().into()]);
        }
        out.extend(["--chdir".into(), dir.as_os_str().into(), "--".into()]);
        out.push(exe.as_os_str().into());
        out.extend(args.iter().map(Into::into));
        (&self.program, out)
    }

    /// Finds bubblewrap and checks that it can make a sandbox here, as a function's user
    /// would (`uid`): its error otherwise.
    fn probe(files: &Path, uid: u32) -> Result<Bubblewrap, String> {
        let program = std::env::var_os("PATH")
            .and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join("bwrap"))
                    .find(|p| p.is_file())
            })
            .ok_or("bubblewrap (bwrap) is not installed: apt-get install bubblewrap")?;
        let sandbox = Bubblewrap::new(program, files);
        let probe_dir = files.join(".probe");
        traversable_dir(&probe_dir).map_err(|e| format!("{}: {e}", probe_dir.display()))?;
        let _ = std::fs::create_dir(probe_dir.join("secrets"));
        let (program, args) = sandbox.command(&probe_dir, Path::new("/bin/sh"), &["-c", "true"]);
        use std::os::unix::process::CommandExt;
        let mut probe = std::process::Command::new(program);
        probe
            .args(&args)
            .uid(uid)
            .gid(uid)
            .stdin(std::process::Stdio::null());
        // As a replica starts: no_new_privs (a setuid bubblewrap cannot work under it).
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            probe.pre_exec(|| {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = probe.output();
        let _ = std::fs::remove_dir_all(&probe_dir);
        match out {
            Ok(o) if o.status.success() => Ok(sandbox),
            Ok(o) => Err(format!(
                "bubblewrap cannot make a sandbox here ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Err(format!("cannot run {}: {e}", sandbox.program.display())),
        }
    }
}

impl Isolation {
    /// The sandbox replicas run in, if any.
    pub fn sandbox(&self) -> Option<&Bubblewrap> {
        match self {
            Isolation::FunctionUsers { sandbox, .. } => sandbox.as_ref(),
            Isolation::ServerUser => None,
        }
    }

    /// Picks the isolation for a local platform named `tag` on this machine (its functions'
    /// files go to `function_dir/tag`), and says which is in force (and why) in the log.
    pub fn choose(
        enabled: bool,
        range: (u32, u32),
        sandbox: SandboxMode,
        function_dir: &Path,
        tag: &str,
        datacenter: &str,
    ) -> io::Result<Isolation> {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        let needs_users = |why: &str| -> io::Result<Isolation> {
            if sandbox == SandboxMode::Bubblewrap {
                return Err(io::Error::other(format!(
                    "local.sandbox = \"bubblewrap\" needs a user per function, and {why}"
                )));
            }
            Ok(Isolation::ServerUser)
        };
        if euid != 0 {
            tracing::warn!(
                datacenter,
                uid = euid,
                "not running as root: functions run as this server's own user and can read its data directory (state, credentials) and each other's secrets; run as root for a user per function"
            );
            return needs_users("this server does not run as root");
        }
        if !enabled {
            tracing::warn!(
                datacenter,
                "local.function_users = false: functions run as root and can read everything this server can"
            );
            return needs_users("local.function_users is false");
        }
        traversable_dir(function_dir)?;
        check_function_dir(function_dir)?;
        let files = function_dir.join(tag);
        if files.exists() {
            std::fs::remove_dir_all(&files)?;
        }
        traversable_dir(&files)?;
        // From a random place in the range: a restarted server does not hand the users of its
        // previous run out again in the same order.
        let start = range.0 + rand::random_range(0..=range.1 - range.0);
        let users = Users::new(range, start, &function_dir.join("users"))?;
        tracing::info!(
            datacenter,
            first = range.0,
            last = range.1,
            files = %files.display(),
            "functions run as a user of their own, with no supplementary groups and no_new_privs"
        );
        let probe_uid = (range.0..=range.1)
            .find(|u| !has_account(*u))
            .unwrap_or(range.0);
        let sandbox = match sandbox {
            SandboxMode::None => {
                tracing::info!(datacenter, "local.sandbox = \"none\": functions see the machine's filesystem and processes as any user does");
                None
            }
            mode => match Bubblewrap::probe(&files, probe_uid) {
                Ok(b) => {
                    tracing::info!(datacenter, "functions run in a bubblewrap sandbox: the filesystem read-only, private /tmp, their secrets at {SECRETS_PATH}, their own PID namespace");
                    Some(b)
                }
                Err(why) if mode == SandboxMode::Auto => {
                    tracing::warn!(datacenter, "functions run without a sandbox: {why}");
                    None
                }
                Err(why) => {
                    return Err(io::Error::other(format!(
                        "local.sandbox = \"bubblewrap\": {why}"
                    )))
                }
            },
        };
        Ok(Isolation::FunctionUsers {
            users,
            files,
            sandbox,
        })
    }
}

/// A stable name for a path (FNV-1a).
pub(super) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Creates `dir` and any missing parents so that others may traverse them but not list them
/// (0711, whatever the umask).
pub fn traversable_dir(dir: &Path) -> io::Result<()> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|p| !p.exists()).collect();
    for p in missing.into_iter().rev() {
        match std::fs::DirBuilder::new().mode(0o711).create(p) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o711))?,
        }
    }
    Ok(())
}

/// Checks that `dir` (which faastastic did not necessarily make) can hold functions' files:
/// a directory (not a link) owned by root that nobody else may write to, and that others may
/// pass through.
fn check_function_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir)?;
    let mode = meta.mode() & 0o7777;
    if !meta.is_dir() || meta.uid() != 0 || mode & 0o022 != 0 || mode & 0o001 == 0 {
        return Err(io::Error::other(format!(
            "local.function_dir {} must be a directory owned by root, writable by root only and open to others to pass through (e.g. mode 711); it is {}owned by uid {} with mode {mode:o}",
            dir.display(),
            if meta.is_dir() { "" } else { "not a directory, " },
            meta.uid()
        )));
    }
    Ok(())
}

/// Hands out users from a range, one per function.
pub struct Users {
    first: u32,
    last: u32,
    locks: PathBuf,
    state: Mutex<UsersState>,
}

struct UsersState {
    next: u32,
    /// The user each function holds while any of its generations exists.
    held: HashMap<String, std::sync::Weak<User>>,
}

/// A user held for a function; released (its lock dropped) when the last holder goes.
pub struct User {
    pub uid: u32,
    _lock: File,
}

impl Users {
    /// Users from `first` to `last`, handed out from `start` on.
    fn new((first, last): (u32, u32), start: u32, locks: &Path) -> io::Result<Users> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(locks)?;
        Ok(Users {
            first,
            last,
            locks: locks.to_path_buf(),
            state: Mutex::new(UsersState {
                next: start.clamp(first, last),
                held: HashMap::new(),
            }),
        })
    }

    /// The user of function `key`, taking the next free one if it has none.
    pub fn claim(&self, key: &str) -> io::Result<Arc<User>> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(user) = state.held.get(key).and_then(std::sync::Weak::upgrade) {
            return Ok(user);
        }
        state.held.retain(|_, u| u.strong_count() > 0);
        let size = u64::from(self.last - self.first) + 1;
        for _ in 0..size {
            let uid = state.next;
            state.next = if uid >= self.last {
                self.first
            } else {
                uid + 1
            };
            if has_account(uid) || is_subordinate(uid) {
                continue; // someone else's: never handed out, its processes never killed
            }
            let path = self.locks.join(format!("{uid}.lock"));
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)?;
            match file.try_lock() {
                Ok(()) => {
                    kill_leftovers(uid);
                    let user = Arc::new(User { uid, _lock: file });
                    state.held.insert(key.to_string(), Arc::downgrade(&user));
                    return Ok(user);
                }
                Err(std::fs::TryLockError::WouldBlock) => continue,
                Err(std::fs::TryLockError::Error(e)) => return Err(e),
            }
        }
        Err(io::Error::other(format!(
            "every user of local.uid_range {}-{} is taken: widen it",
            self.first, self.last
        )))
    }
}

/// Whether `uid` belongs to an account (the system's user database knows it).
fn has_account(uid: u32) -> bool {
    let mut size = 4096;
    loop {
        let mut pwd = std::mem::MaybeUninit::<libc::passwd>::uninit();
        let mut buf = vec![0 as libc::c_char; size];
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; the result points into `pwd` and `buf`.
        let rc = unsafe {
            libc::getpwuid_r(
                uid,
                pwd.as_mut_ptr(),
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        match rc {
            0 => return !found.is_null(),
            // An entry too large for the buffer is an entry.
            libc::ERANGE if size < 1 << 20 => size *= 4,
            libc::ERANGE => return true,
            _ => return false,
        }
    }
}

/// Whether `uid` lies in a range `/etc/subuid` or `/etc/subgid` gives to an account (for its
/// containers).
fn is_subordinate(uid: u32) -> bool {
    ["/etc/subuid", "/etc/subgid"].iter().any(|file| {
        std::fs::read_to_string(file).is_ok_and(|text| {
            text.lines().any(|line| {
                let mut fields = line.split(':').skip(1);
                let (Some(Ok(start)), Some(Ok(count))) = (
                    fields.next().map(str::parse::<u64>),
                    fields.next().map(|c| c.trim().parse::<u64>()),
                ) else {
                    return false;
                };
                (start..start + count).contains(&u64::from(uid))
            })
        })
    })
}

/// Kills every process running as `uid` (`/proc/PID/status`, real or effective user).
fn kill_leftovers(uid: u32) {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let runs_as = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .is_some_and(|ids| {
                ids.split_whitespace()
                    .take(2)
                    .any(|id| id == uid.to_string())
            });
        if runs_as {
            tracing::warn!(
                pid,
                uid,
                "killing a process left running as a user being handed to a function"
            );
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Gives a generation's directory to its function's user: the directory (0700), its secrets
/// directory (0500) and each secret (0400), owned by `uid` and its group.
///
/// Called once per generation, before any of its replicas runs: until then the directory is
/// root's (0700) and nothing of the function's can have changed what is in it. Links are not
/// followed all the same.
pub fn hand_over(dir: &Path, uid: u32) -> io::Result<()> {
    let own = |path: &Path, mode: u32| -> io::Result<()> {
        let meta = std::fs::symlink_metadata(path)?;
        if meta.file_type().is_symlink() {
            return Err(io::Error::other(format!(
                "{} is a symbolic link; not handed over",
                path.display()
            )));
        }
        std::os::unix::fs::lchown(path, Some(uid), Some(uid))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    };
    let secrets = dir.join("secrets");
    if std::fs::symlink_metadata(&secrets).is_ok_and(|m| m.is_dir()) {
        for entry in std::fs::read_dir(&secrets)? {
            own(&entry?.path(), 0o400)?;
        }
        own(&secrets, 0o500)?;
    }
    own(dir, 0o700)
}

/// Warns when a file holding a secret (a token, a password) can be read by users other than
/// its owner: functions run as other users and could read it.
pub fn warn_if_readable_by_others(path: &Path, what: &str) {
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                file = %path.display(),
                "{what} {} is readable by other users (mode {mode:o}), functions included: chmod 600 it",
                path.display()
            );
        }
    }
}

/// What the child does before it runs its program: joins its replica's control groups
/// (`cgroup_procs`: their `cgroup.procs` files; before anything of it runs, so nothing it
/// starts escapes its limits), takes `uid` and its group with no supplementary groups, and
/// sets `no_new_privs` (no program it starts gains privileges). Joining comes before the
/// change of user, since only root may write those files.
pub fn enter(
    cmd: &mut tokio::process::Command,
    uid: Option<u32>,
    cgroup_procs: &[PathBuf],
) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let procs = cgroup_procs
        .iter()
        .map(|p| std::ffi::CString::new(p.as_os_str().as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io::Error::other)?;
    // SAFETY: the closure makes only async-signal-safe system calls and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if !procs.is_empty() {
                let mut digits = [0u8; 20];
                let mut at = digits.len();
                let mut pid = libc::getpid() as u32;
                loop {
                    at -= 1;
                    digits[at] = b'0' + (pid % 10) as u8;
                    pid /= 10;
                    if pid == 0 {
                        break;
                    }
                }
                for path in &procs {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    let wrote = libc::write(fd, digits[at..].as_ptr().cast(), digits.len() - at);
                    let err = io::Error::last_os_error();
                    libc::close(fd);
                    if wrote < 0 {
                        return Err(err);
                    }
                }
            }
            if let Some(uid) = uid {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(uid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}

/// A copy of the program `exe` that functions' users can run, in `function_dir`: one per
/// build (named by the file's device, inode, size and time), shared by every server and
/// datacenter on the machine and made once (written aside, then renamed into place).
pub fn reachable_copy(exe: &Path, function_dir: &Path) -> io::Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(exe)?;
    let copy = function_dir.join(format!(
        "faastastic-{:x}-{:x}-{:x}-{:x}",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime()
    ));
    if !copy.exists() {
        let staged = function_dir.join(format!(".faastastic-{}", std::process::id()));
        std::fs::copy(exe, &staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&staged, &copy)?;
    }
    Ok(copy)
}

/// Whether every directory above `path` lets others through and `path` lets them execute it.
pub fn executable_by_others(path: &Path) -> bool {
    let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode());
    if !mode(path).is_ok_and(|m| m & 0o001 != 0) {
        return false;
    }
    path.ancestors()
        .skip(1)
        .filter(|p| !p.as_os_str().is_empty())
        .all(|p| mode(p).is_ok_and(|m| m & 0o001 != 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_handed_out_in_order_once_per_function_and_held_across_holders() {
        // Far from any account: handing a user out kills its processes.
        const FIRST: u32 = 3_999_980;
        let dir = tempfile::tempdir().unwrap();
        let users = Users::new((FIRST, FIRST + 2), FIRST, &dir.path().join("users")).unwrap();
        let a = users.claim("a").unwrap();
        assert_eq!(a.uid, FIRST);
        assert_eq!(
            users.claim("a").unwrap().uid,
            FIRST,
            "the same function, the same user"
        );
        let b = users.claim("b").unwrap();
        assert_eq!(b.uid, FIRST + 1);
        // Another holder of the range (another process, or another datacenter) skips
        // the users this one holds.
        let other = Users::new((FIRST, FIRST + 2), FIRST, &dir.path().join("users")).unwrap();
        let z = other.claim("z").unwrap();
        assert_eq!(z.uid, FIRST + 2);
        let err = users.claim("c").err().unwrap().to_string();
        assert!(
            err.contains(&format!("local.uid_range {FIRST}-{}", FIRST + 2)),
            "{err}"
        );
        // Released once its last holder goes; not handed out again before the range wraps.
        drop(a);
        assert_eq!(users.claim("c").unwrap().uid, FIRST);
        drop(z);
    }

    #[test]
    fn an_account_s_user_is_never_handed_out() {
        assert!(has_account(0), "root has an account");
        assert!(!has_account(3_999_970));
        let dir = tempfile::tempdir().unwrap();
        let users = Users::new((0, 0), 0, &dir.path().join("users")).unwrap();
        let err = users.claim("f").err().unwrap().to_string();
        assert!(err.contains("local.uid_range 0-0"), "{err}");
    }

    #[test]
    fn a_process_left_running_as_a_user_is_killed_before_the_user_is_handed_out() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return; // only root can start a process as another user
        }
        use std::os::unix::process::{CommandExt, ExitStatusExt};
        let uid = 3_999_990;
        let mut left = std::process::Command::new("sleep")
            .arg("30")
            .uid(uid)
            .gid(uid)
            .spawn()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let users = Users::new((uid, uid), uid, &dir.path().join("users")).unwrap();
        let user = users.claim("f").unwrap();
        assert_eq!(user.uid, uid);
        let status = left.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    }

    #[test]
    fn a_hand_over_follows_no_link_and_a_function_dir_must_be_roots_alone() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return; // only root can give files away
        }
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("precious"), "x").unwrap();
        let generation = dir.path().join("1");
        std::fs::create_dir(&generation).unwrap();
        std::os::unix::fs::symlink(&target, generation.join("secrets")).unwrap();
        hand_over(&generation, 3_999_950).unwrap();
        let precious = std::fs::metadata(target.join("precious")).unwrap();
        assert_eq!(precious.uid(), 0, "followed the link");
        assert_eq!(std::fs::metadata(&generation).unwrap().uid(), 3_999_950);

        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = check_function_dir(&open).unwrap_err().to_string();
        assert!(err.contains("writable by root only"), "{err}");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o711)).unwrap();
        check_function_dir(&open).unwrap();
    }

    #[test]
    fn a_path_inside_a_private_directory_is_not_executable_by_others() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("private");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&private)
            .unwrap();
        let exe = private.join("prog");
        std::fs::write(&exe, "").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(!executable_by_others(&exe));
        // Open every directory from the temporary one down: whether the program is reachable
        // now depends on the directories above the temporary one only.
        for d in [&private, &dir.path().to_path_buf()] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711)).unwrap();
        }
        let above = dir.path().ancestors().skip(1).all(|p| {
            p.as_os_str().is_empty() || std::fs::metadata(p).unwrap().permissions().mode() & 1 != 0
        });
        assert_eq!(executable_by_others(&exe), above);
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(!executable_by_others(&exe));
    }
}
