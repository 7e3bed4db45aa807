//! The NATS load of the benchmark suite (`scripts/bench.sh nats`): publishes COUNT messages to
//! SUBJECT on a JetStream server (every publication acknowledged by the stream), then waits
//! until the durable consumer whose name starts with CONSUMER_PREFIX has acknowledged up to the
//! last of them. Prints `seconds last_sequence`: from the first publication to the last
//! acknowledgement by the consumer (faastastic acknowledges after the function's 2xx).
//!
//! Usage: nats_load URL STREAM SUBJECT COUNT CONSUMER_PREFIX [TIMEOUT_SECS]

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use futures::StreamExt;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 5 {
        eprintln!("usage: nats_load URL STREAM SUBJECT COUNT CONSUMER_PREFIX [TIMEOUT_SECS]");
        std::process::exit(2);
    }
    let (url, stream_name, subject) = (&args[0], &args[1], args[2].clone());
    let count: usize = args[3].parse().expect("COUNT is a number");
    let prefix = &args[4];
    let timeout = Duration::from_secs(args.get(5).and_then(|t| t.parse().ok()).unwrap_or(120));
    let client = async_nats::connect(url.as_str()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(stream_name).await.expect("the stream exists");
    let mut consumer = None;
    let mut names = stream.consumer_names();
    while let Some(Ok(n)) = names.next().await {
        if n.starts_with(prefix.as_str()) {
            consumer = Some(n);
        }
    }
    let consumer = consumer.unwrap_or_else(|| panic!("no consumer named {prefix}*"));
    let started = Instant::now();
    // Publications in flight at once, their acknowledgements awaited in order.
    let mut acks = futures::stream::FuturesOrdered::new();
    let mut last = 0;
    for i in 0..count {
        let ack = js
            .publish(subject.clone(), format!("{i}").into())
            .await
            .expect("publish");
        acks.push_back(ack.into_future());
        if acks.len() >= 256 {
            last = acks.next().await.unwrap().expect("stored").sequence;
        }
    }
    while let Some(ack) = acks.next().await {
        last = ack.expect("stored").sequence;
    }
    loop {
        let info = stream
            .consumer_info(&consumer)
            .await
            .expect("consumer info");
        if info.ack_floor.stream_sequence >= last {
            break;
        }
        if started.elapsed() > timeout {
            eprintln!(
                "the consumer acknowledged up to {} of {last} within {timeout:?}",
                info.ack_floor.stream_sequence
            );
            std::process::exit(1);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("{:.6} {last}", started.elapsed().as_secs_f64());
}
