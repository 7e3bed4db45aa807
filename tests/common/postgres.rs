//! A real PostgreSQL server for the tests: Debian's `postgresql` binaries, a fresh data
//! directory (initdb) and a free loopback port, run as the `postgres` user when the tests run
//! as root (PostgreSQL refuses to run as root). Stopped when dropped.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The superuser's password (connections over TCP must give it).
pub const PASSWORD: &str = "test-secret-pw";

pub struct Postgres {
    child: Option<Child>,
    bin: PathBuf,
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// The `postgres` user's uid and gid when the tests run as root.
    owner: Option<(u32, u32)>,
    extra: Vec<String>,
}

/// Where Debian keeps the server's programs (not on PATH): the newest version's.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    versions.retain(|p| p.join("initdb").is_file());
    versions.sort();
    match versions.pop() {
        Some(dir) => dir,
        None => panic!(
            "PostgreSQL's server is required by this test and is not installed: apt-get install -y postgresql (or run ./scripts/test.sh)"
        ),
    }
}

fn postgres_owner() -> Option<(u32, u32)> {
    if !super::is_root() {
        return None;
    }
    let out = Command::new("id").args(["-u", "postgres"]).output().ok()?;
    let uid = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    let out = Command::new("id").args(["-g", "postgres"]).output().ok()?;
    let gid = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    Some((uid, gid))
}

impl Postgres {
    /// A new cluster on a free port, started and accepting connections.
    pub fn start() -> Postgres {
        Postgres::start_with(&[])
    }

    /// With extra `-c name=value` settings (e.g. TLS).
    pub fn start_with(settings: &[&str]) -> Postgres {
        let bin = bin_dir();
        let owner = postgres_owner();
        assert!(
            owner.is_some() || !super::is_root(),
            "the tests run as root and there is no postgres user to run PostgreSQL as: apt-get install -y postgresql"
        );
        let dir = tempfile::Builder::new()
            .prefix("faastastic-pg")
            .tempdir()
            .unwrap();
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, PASSWORD).unwrap();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid)).unwrap();
        }
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args(["--no-sync", "-U", "postgres", "-E", "UTF8", "--locale=C"])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .arg("-D")
            .arg(dir.path().join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = owner {
            initdb.uid(uid).gid(gid);
        }
        let out = initdb.output().expect("cannot run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = Postgres {
            child: None,
            bin,
            port: super::free_port(),
            dir,
            owner,
            extra: settings.iter().map(|s| s.to_string()).collect(),
        };
        pg.up();
        pg
    }

    /// Hands a file to the server's user (certificates it reads).
    pub fn give(&self, path: &Path) {
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
        }
    }

    /// Starts the server (again) on its port and waits until it accepts connections.
    pub fn up(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .args(["-c", "fsync=off", "-c", "max_connections=200"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for setting in &self.extra {
            cmd.args(["-c", setting]);
        }
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        self.child = Some(cmd.spawn().expect("cannot start postgres"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-t", "1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("postgres exited at start: {status}");
            }
            assert!(Instant::now() < deadline, "postgres did not start in 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server at once (as a crash would: no checkpoint), and waits for it.
    pub fn down(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGQUIT: immediate shutdown, the backends go too.
            unsafe { libc::kill(child.id() as i32, libc::SIGQUIT) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A URL for `database` (created when missing) with the password in it.
    pub fn url(&self, database: &str) -> String {
        self.create_database(database);
        format!(
            "postgres://postgres:{PASSWORD}@127.0.0.1:{}/{database}",
            self.port
        )
    }

    /// The same database without the password (given through a file instead).
    pub fn url_without_password(&self, database: &str) -> String {
        self.create_database(database);
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Runs SQL through psql over the local socket, as the superuser; its output.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h"])
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                database,
            ])
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("cannot run psql");
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn create_database(&self, database: &str) {
        if database == "postgres" {
            return;
        }
        let exists = self.psql(
            "postgres",
            &format!("SELECT count(*) FROM pg_database WHERE datname = '{database}'"),
        );
        if exists == "0" {
            self.psql("postgres", &format!("CREATE DATABASE \"{database}\""));
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.down();
    }
}
