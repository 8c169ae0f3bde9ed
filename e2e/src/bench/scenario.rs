//! What a benchmark run does: clients, topics, QoS, payload, pacing, sessions, duration.

use std::time::Duration;

use serde::Serialize;

use super::codec::QoS;

/// How publishers' topics map onto subscribers' filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// Publisher i → `bench/p2p/i`, subscriber i subscribes to it (needs pubs == subs).
    Pairs,
    /// Publisher i → `bench/in/i`; every subscriber subscribes to `bench/in/+`.
    FanIn,
    /// Every publisher → `bench/out`; every subscriber subscribes to it.
    FanOut,
}

impl Layout {
    pub fn topic(self, run: &str, publisher: usize) -> String {
        match self {
            Layout::Pairs => format!("bench/{run}/p2p/{publisher}"),
            Layout::FanIn => format!("bench/{run}/in/{publisher}"),
            Layout::FanOut => format!("bench/{run}/out"),
        }
    }

    pub fn filter(self, run: &str, subscriber: usize) -> String {
        match self {
            Layout::Pairs => format!("bench/{run}/p2p/{subscriber}"),
            Layout::FanIn => format!("bench/{run}/in/+"),
            Layout::FanOut => format!("bench/{run}/out"),
        }
    }

    /// Whether subscriber `s` receives publisher `p`'s messages.
    pub fn matches(self, subscriber: usize, publisher: usize) -> bool {
        match self {
            Layout::Pairs => subscriber == publisher,
            Layout::FanIn | Layout::FanOut => true,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    pub name: String,
    /// One line for the report.
    pub description: String,
    pub publishers: usize,
    pub subscribers: usize,
    pub layout: Layout,
    /// QoS of both the PUBLISH and the subscriptions.
    pub qos: u8,
    pub payload: usize,
    /// Open loop: messages per second per publisher. `None`: closed loop, as fast as the
    /// in-flight window (QoS 1/2) or the socket (QoS 0) allows.
    pub rate: Option<f64>,
    /// Unacknowledged QoS 1/2 messages a publisher may have outstanding.
    pub window: usize,
    /// Subscribers connect with clean_session=false (persistent sessions) when false.
    pub clean_subscribers: bool,
    /// Subscribers are ferrymq APPLICATION clients (their ids are listed in the broker's
    /// `[[application_clients]]`; durable log). Other brokers see ordinary persistent sessions.
    /// Implies persistent subscribers.
    #[serde(default)]
    pub application: bool,
    #[serde(with = "secs")]
    pub duration: Duration,
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

impl Scenario {
    /// Client id of subscriber `i`. APPLICATION subscribers have fixed ids (the broker must list
    /// them in its configuration before it starts); everyone else is unique per run.
    pub fn subscriber_id(&self, run_id: &str, i: usize) -> String {
        if self.application {
            format!("fmqb-app-{}-s{i}", self.name)
        } else {
            format!("fmqb-{run_id}-s{i}")
        }
    }

    /// The client ids a ferrymq broker must know as APPLICATION clients for this scenario.
    pub fn application_client_ids(&self) -> Vec<String> {
        if self.application {
            (0..self.subscribers)
                .map(|i| self.subscriber_id("", i))
                .collect()
        } else {
            Vec::new()
        }
    }

    /// Whether subscribers keep a session across connections (clean_session=false): the
    /// scenarios where durability settings apply.
    pub fn persistent(&self) -> bool {
        !self.clean_subscribers || self.application
    }

    pub fn qos(&self) -> QoS {
        QoS::from_u8(self.qos).unwrap_or(QoS::AtMostOnce)
    }

    /// Loss is a failure for QoS 1/2 (subscribers stay connected the whole run).
    pub fn loss_allowed(&self) -> bool {
        self.qos == 0
    }

    /// Closed loop: publishers offer more than a broker may be able to deliver, so a broker
    /// that acknowledges faster than its subscribers drain overflows its bounded queues.
    pub fn overload(&self) -> bool {
        self.rate.is_none()
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.publishers > 0 && self.subscribers > 0,
            "need publishers and subscribers"
        );
        anyhow::ensure!(self.qos <= 2, "qos must be 0, 1 or 2");
        anyhow::ensure!(
            self.payload >= super::run::STAMP_LEN,
            "payload must be at least {} bytes",
            super::run::STAMP_LEN
        );
        anyhow::ensure!(
            self.window >= 1 && self.window < 65535,
            "window must be 1..65535"
        );
        if self.layout == Layout::Pairs {
            anyhow::ensure!(
                self.publishers == self.subscribers,
                "pairs layout needs pubs == subs"
            );
        }
        if let Some(r) = self.rate {
            anyhow::ensure!(r > 0.0, "rate must be positive");
        }
        Ok(())
    }
}

/// The named scenarios of the suite. `duration` applies to all.
pub fn suite(duration: Duration) -> Vec<Scenario> {
    let s = |name: &str,
             description: &str,
             publishers,
             subscribers,
             layout,
             qos,
             payload,
             rate,
             window,
             clean_subscribers| Scenario {
        application: false,
        name: name.to_string(),
        description: description.to_string(),
        publishers,
        subscribers,
        layout,
        qos,
        payload,
        rate,
        window,
        clean_subscribers,
        duration,
    };
    use Layout::*;
    let mut app = s("fanin-qos1-application", "100 devices at 100 msg/s each -> 1 APPLICATION client (bench/in/+; ferrymq: listed in [[application_clients]], durable log; others: persistent subscriber), QoS 1, 64 B", 100, 1, FanIn, 1, 64, Some(100.0), 10, false);
    app.application = true;
    vec![
        s("p2p-qos0-64b", "1 publisher -> 1 subscriber, QoS 0, 64 B, max rate", 1, 1, Pairs, 0, 64, None, 20, true),
        s("p2p-qos1-64b", "1 -> 1, QoS 1, 64 B, 20 in flight, max rate", 1, 1, Pairs, 1, 64, None, 20, true),
        s("p2p-qos2-64b", "1 -> 1, QoS 2, 64 B, 20 in flight, max rate", 1, 1, Pairs, 2, 64, None, 20, true),
        s("p2p-qos1-1k", "1 -> 1, QoS 1, 1 KiB, 20 in flight, max rate", 1, 1, Pairs, 1, 1024, None, 20, true),
        s("pairs10-qos1-64b", "10 independent pairs, QoS 1, 64 B, 20 in flight each", 10, 10, Pairs, 1, 64, None, 20, true),
        s("fanin-qos1-persistent", "100 devices at 100 msg/s each -> 1 persistent DEVICE subscriber (bench/in/+), QoS 1, 64 B", 100, 1, FanIn, 1, 64, Some(100.0), 10, false),
        app,
        s("fanout-qos0-64b", "1 publisher -> 50 subscribers, QoS 0, 64 B, 2,000 msg/s", 1, 50, FanOut, 0, 64, Some(2_000.0), 20, true),
        s("fanout-qos1-persistent", "1 publisher -> 50 persistent device subscribers, QoS 1, 64 B, 20 in flight", 1, 50, FanOut, 1, 64, None, 20, false),
        s("pairs10-qos1-persistent", "10 pairs, persistent device subscribers (clean_session=false), QoS 1, 64 B, 20 in flight each (group commit across publishers)", 10, 10, Pairs, 1, 64, None, 20, false),
        s("p2p-qos1-persistent", "1 -> 1 persistent device subscriber (clean_session=false), QoS 1, 64 B, 20 in flight", 1, 1, Pairs, 1, 64, None, 20, false),
        s("latency-qos0-20k", "1 -> 1, QoS 0, 64 B, fixed 20,000 msg/s (latency under fixed load)", 1, 1, Pairs, 0, 64, Some(20_000.0), 20, true),
        s("latency-qos1-10k", "1 -> 1, QoS 1, 64 B, fixed 10,000 msg/s (latency under fixed load)", 1, 1, Pairs, 1, 64, Some(10_000.0), 100, true),
    ]
}
