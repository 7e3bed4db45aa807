//! A Docker engine for the docker and swarm tests, and a test image built without pulling.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{require_program, BIN};

/// Fails (never skips) when the engine is not there.
pub fn require_docker() {
    require_program("docker", "docker.io");
    let info = Command::new("docker").arg("info").output().unwrap();
    assert!(
        info.status.success(),
        "dockerd is not running (start it with `dockerd &`, or run ./scripts/test.sh): {}",
        String::from_utf8_lossy(&info.stderr)
    );
}

/// Fails (never skips) when the engine is not a swarm manager.
pub fn require_swarm() {
    require_docker();
    let out = Command::new("docker")
        .args(["info", "--format", "{{.Swarm.LocalNodeState}}"])
        .output()
        .unwrap();
    let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        state, "active",
        "this engine is not in a swarm (docker swarm init --advertise-addr 127.0.0.1, or run ./scripts/test.sh)"
    );
}

fn copy_into(root: &Path, file: &Path) {
    let target = root.join(file.strip_prefix("/").unwrap());
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::copy(file, &target).unwrap();
}

/// A minimal image: `/faastastic watchdog` as entrypoint, busybox as `sh` and `cat`.
pub fn build_image(tag: &str) {
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs(dir.path());
    import(&root, tag, r#"ENTRYPOINT ["/faastastic", "watchdog"]"#);
}

/// What an image from the OpenFaaS templates does, without knowing faastastic: it serves on
/// port 8080 whatever its environment says, binds a second fixed port (8081, as the
/// of-watchdog's metrics do) and exits with status 2 when it cannot, and answers `/_/health`.
/// A function deployed with env `crash` set prints it and exits with status 2 instead.
pub const STOCK_ENTRYPOINT: &str = r#"#!/bin/sh
if [ -n "$crash" ]; then echo "starting"; echo "$crash" >&2; exit 2; fi
httpd -p 8081 -h /www || { echo "listen tcp :8081: bind: address already in use" >&2; exit 2; }
exec env faastastic_listen=0.0.0.0:8080 port=8080 /faastastic watchdog
"#;

/// An image that behaves as [`STOCK_ENTRYPOINT`] says.
pub fn build_stock_image(tag: &str) {
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs(dir.path());
    std::fs::create_dir_all(root.join("www")).unwrap();
    std::fs::write(root.join("www/index.html"), "metrics\n").unwrap();
    let entry = root.join("entrypoint.sh");
    std::fs::write(&entry, STOCK_ENTRYPOINT).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o755)).unwrap();
    import(&root, tag, r#"ENTRYPOINT ["/entrypoint.sh"]"#);
}

/// `dir/rootfs` with faastastic, the libraries it links and busybox's `sh`, `cat`, `echo`,
/// `env` and `httpd`.
fn rootfs(dir: &Path) -> PathBuf {
    require_program("busybox", "busybox-static");
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy(BIN, root.join("faastastic")).unwrap();
    let ldd = Command::new("ldd").arg(BIN).output().unwrap();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = line
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(PathBuf::from);
        if let Some(path) = path {
            copy_into(&root, &path);
        }
    }
    let busybox = which("busybox");
    std::fs::copy(&busybox, root.join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "echo", "env", "httpd"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    root
}

/// `docker import` of a root file system as `tag`, with `change` (an `ENTRYPOINT`).
fn import(root: &Path, tag: &str, change: &str) {
    let tar = root.with_extension("tar");
    let ok = Command::new("tar")
        .arg("-C")
        .arg(root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(ok.success());
    let out = Command::new("docker")
        .args(["import", "--change", change])
        .arg(&tar)
        .arg(tag)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn which(program: &str) -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap()
}

/// An image removed when dropped.
pub struct Image(pub String);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rmi", "-f", &self.0]).output();
    }
}

/// Removes every container and service of a datacenter when dropped, so that a test that
/// fails (its server killed without cleaning up) leaves no replica restarting forever.
/// Declare it before the server: it is dropped after it.
pub struct Sweep(pub String);

impl Drop for Sweep {
    fn drop(&mut self) {
        let label = format!("label=com.faastastic.datacenter={}", self.0);
        let listed = |args: &[&str]| -> Vec<String> {
            let out = Command::new("docker").args(args).output();
            out.map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
        };
        let services = listed(&["service", "ls", "-q", "--filter", &label]);
        if !services.is_empty() {
            let _ = Command::new("docker")
                .args(["service", "rm"])
                .args(&services)
                .output();
        }
        let containers = listed(&["ps", "-aq", "--filter", &label]);
        if !containers.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f"])
                .args(&containers)
                .output();
        }
    }
}

/// A Unix socket that forwards to the real engine's socket, and can be cut: while it is down,
/// faastastic sees an engine that does not answer (connections refused, open ones closed),
/// while the containers keep running. It forwards on the test's runtime, which needs a worker
/// to spare while the test blocks (a multi-threaded runtime).
pub struct EngineLink {
    pub path: PathBuf,
    serving: Option<tokio::task::JoinHandle<()>>,
}

impl EngineLink {
    pub fn start(path: &Path) -> EngineLink {
        let mut link = EngineLink {
            path: path.to_path_buf(),
            serving: None,
        };
        link.up();
        link
    }

    pub fn up(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let listener = tokio::net::UnixListener::bind(&self.path).unwrap();
        self.serving = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                conns.spawn(async move {
                    let Ok(mut engine) =
                        tokio::net::UnixStream::connect("/var/run/docker.sock").await
                    else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut engine).await;
                });
            }
        }));
    }

    /// Refuses new connections and closes the open ones (dropping the task aborts them all).
    pub fn down(&mut self) {
        if let Some(t) = self.serving.take() {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for EngineLink {
    fn drop(&mut self) {
        self.down();
    }
}
