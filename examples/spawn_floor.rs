//! The floor for classic-mode invocations (`scripts/bench.sh classic`): the least a program
//! can do to run a command once per request. THREADS threads each loop for SECONDS: start
//! COMMAND with its standard streams piped, write BODY to its stdin, read its stdout to the
//! end and wait for it. Prints `runs seconds cpu_seconds loop_cpu_seconds` (the CPU of this
//! process and of every command it ran, then of this process alone).
//!
//! Usage: spawn_floor THREADS SECONDS BODY COMMAND [ARGS...]

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// CPU seconds of this process, and with `children` of the commands it ran too.
fn cpu_seconds(children: bool) -> f64 {
    let mut total = 0.0;
    let whose: &[libc::c_int] = if children {
        &[libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN]
    } else {
        &[libc::RUSAGE_SELF]
    };
    for &who in whose {
        // SAFETY: getrusage fills the zeroed struct it is given.
        let usage = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::getrusage(who, &mut usage);
            usage
        };
        for t in [usage.ru_utime, usage.ru_stime] {
            total += t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        }
    }
    total
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [threads, seconds, body, command @ ..] = &args[..] else {
        eprintln!("usage: spawn_floor THREADS SECONDS BODY COMMAND [ARGS...]");
        std::process::exit(2);
    };
    assert!(!command.is_empty(), "no command given");
    let threads: usize = threads.parse().expect("THREADS is a number");
    let seconds: f64 = seconds.parse().expect("SECONDS is a number");
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let (cpu_before, loop_before) = (cpu_seconds(true), cpu_seconds(false));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (command, body) = (command.to_vec(), body.clone());
            std::thread::spawn(move || {
                let mut runs = 0u64;
                while Instant::now() < deadline {
                    let mut child = Command::new(&command[0])
                        .args(&command[1..])
                        .stdin(Stdio::piped())
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .spawn()
                        .expect("the command starts");
                    let mut stdin = child.stdin.take().expect("piped");
                    stdin
                        .write_all(body.as_bytes())
                        .expect("the body is written");
                    drop(stdin);
                    let out = child.wait_with_output().expect("the command ends");
                    assert!(out.status.success(), "the command failed: {out:?}");
                    runs += 1;
                }
                runs
            })
        })
        .collect();
    let runs: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    println!(
        "{runs} {:.3} {:.3} {:.3}",
        started.elapsed().as_secs_f64(),
        cpu_seconds(true) - cpu_before,
        cpu_seconds(false) - loop_before
    );
}
