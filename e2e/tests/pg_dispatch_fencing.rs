//! The PostgreSQL writer of the Kafka + PostgreSQL backend under several active nodes (issue 14,
//! `cluster.enabled = true`), against a real private PostgreSQL: router batches are fenced by the
//! epoch of their partition claim, one at a time inside a group commit, and DEVICE sequence
//! numbers come from SQL, so two writers on one schema never hand out the same one.
//!
//! Skipped with a message where PostgreSQL is missing, unless `FERRYMQ_REQUIRE_SERVICES=1`.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use ferrymq::config::PostgresConfig;
use ferrymq::message::Message;
use ferrymq::metrics::Metrics;
use ferrymq::protocol::{QoS, RetainForwardRule};
use ferrymq::router::SubscriptionOptions;
use ferrymq::storage::postgres::PgStore;
use ferrymq::storage::{
    ClientKind, Enqueued, SessionOwner, SessionRecord, SessionTimer, StorageError, WriteBatch,
    WriteOp,
};
use ferrymq_e2e::harness::services::{require_services, Postgres};

fn config(pg: &Postgres, schema: &str) -> PostgresConfig {
    PostgresConfig {
        url: pg.url(),
        schema: schema.to_string(),
        ..PostgresConfig::default()
    }
}

async fn open(pg: &Postgres, schema: &str, cluster: bool) -> PgStore {
    let (store, _lock) = PgStore::connect(
        &config(pg, schema),
        10_000,
        Arc::new(Metrics::new()),
        cluster,
    )
    .await
    .expect("connect to postgres");
    store
}

fn delivery(payload: &str) -> Enqueued {
    Enqueued {
        message: Arc::new(Message {
            topic: Bytes::from_static(b"t"),
            payload: Bytes::from(payload.to_string()),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Default::default(),
            received_at: Instant::now(),
            publisher: "pub".into(),
        }),
        qos: QoS::AtLeastOnce,
        retain: false,
        expires_at_ms: 0,
        subscription_ids: Vec::new(),
    }
}

fn enqueue(client: &str, payload: &str) -> WriteOp {
    WriteOp::Enqueue {
        client: client.into(),
        kind: ClientKind::Device,
        delivery: delivery(payload),
        notify: None,
        origin: None,
    }
}

/// A DEVICE session record written by `PutSession`.
fn device_session(client: &str, expiry_interval: u32, disconnected_at_ms: u64) -> WriteOp {
    WriteOp::PutSession {
        client: client.into(),
        record: SessionRecord {
            kind: ClientKind::Device,
            expiry_interval,
            disconnected_at_ms,
        },
    }
}

/// A private PostgreSQL cluster and a runtime (`threads` workers; 0: current thread), or
/// `None` (test skipped) where PostgreSQL cannot run and it is not required.
fn start(threads: usize) -> Option<(Postgres, tokio::runtime::Runtime)> {
    if !require_services() {
        return None;
    }
    let pg = Postgres::start().expect("start postgres");
    let mut builder = match threads {
        0 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    let rt = builder.enable_all().build().expect("runtime");
    Some((pg, rt))
}

async fn put_device_session(store: &PgStore, client: &str) {
    let mut batch = WriteBatch::default();
    batch.push(device_session(client, u32::MAX, 1));
    store
        .submit(batch)
        .await
        .expect("writer")
        .expect("put session");
}

fn rows(pg: &Postgres, schema: &str, sql: &str) -> Vec<String> {
    pg.psql(&format!("SET search_path = {schema}; {sql}"))
        .expect("psql")
        .lines()
        .filter(|l| !l.is_empty() && *l != "SET")
        .map(str::to_string)
        .collect()
}

/// Two router batches in one group commit: the one read under a claim that was superseded is
/// refused with `Fenced` and none of its writes (DEVICE append, position) is applied; the other
/// one, for a partition still held, is applied. Then a claim by a second node fences the first
/// node's next batch for that partition, and the second node stores from the position the first
/// one stored.
#[test]
fn a_fenced_batch_is_refused_and_its_group_is_applied() {
    let Some((pg, rt)) = start(0) else {
        return;
    };
    rt.block_on(async {
        for cluster in [false, true] {
            let schema = format!("fence_{cluster}");
            let store = open(&pg, &schema, cluster).await;
            store
                .init_router_positions(&[(0, 100), (1, 200)])
                .await
                .expect("init positions");
            let (stale, start0) = store.claim_partition(0, "a", 0).await.expect("claim 0");
            assert_eq!(start0, 100);
            let (held, start1) = store.claim_partition(1, "a", 0).await.expect("claim 1");
            assert_eq!(start1, 200);
            put_device_session(&store, "dev").await;
            // Partition 0 claimed again (a rebalance): batches read under `stale` are fenced.
            let (current, again) = store.claim_partition(0, "b", 0).await.expect("reclaim 0");
            assert_eq!((current, again), (stale + 1, 100));

            let mut fenced = WriteBatch::default();
            fenced.push(enqueue("dev", "from-stale-claim"));
            fenced.push(WriteOp::RouterPosition {
                partition: 0,
                next_offset: 110,
                epoch: stale,
            });
            let mut fine = WriteBatch::default();
            fine.push(enqueue("dev", "from-held-claim"));
            fine.push(WriteOp::RouterPosition {
                partition: 1,
                next_offset: 210,
                epoch: held,
            });
            // Submitted back to back on a current-thread runtime: the writer takes both into
            // one group.
            let a = store.submit(fenced);
            let b = store.submit(fine);
            let (a, b) = (a.await.expect("writer"), b.await.expect("writer"));
            assert!(
                matches!(a, Err(StorageError::Fenced { partition: 0, epoch }) if epoch == stale),
                "cluster={cluster}: the stale batch was not fenced: {a:?}"
            );
            assert!(b.is_ok(), "cluster={cluster}: the held batch failed: {b:?}");

            let offsets = rows(
                &pg,
                &schema,
                "SELECT partition, next_offset, epoch, owner_node FROM router_offsets ORDER BY 1",
            );
            assert_eq!(
                offsets,
                vec![format!("0|100|{current}|b"), format!("1|210|{held}|a")],
                "cluster={cluster}"
            );
            let queued = rows(
                &pg,
                &schema,
                "SELECT seq FROM device_queue WHERE client_id = 'dev' ORDER BY seq",
            );
            assert_eq!(
                queued,
                vec!["1"],
                "cluster={cluster}: only the held batch's append"
            );
            let next = rows(
                &pg,
                &schema,
                "SELECT next_seq FROM sessions WHERE client_id = 'dev'",
            );
            assert_eq!(next, vec!["2"], "cluster={cluster}");

            // The current owner stores on.
            let mut owner = WriteBatch::default();
            owner.push(enqueue("dev", "from-new-owner"));
            owner.push(WriteOp::RouterPosition {
                partition: 0,
                next_offset: 120,
                epoch: current,
            });
            store
                .submit(owner)
                .await
                .expect("writer")
                .expect("the current claim stores");
            assert_eq!(
                rows(
                    &pg,
                    &schema,
                    "SELECT next_offset FROM router_offsets WHERE partition = 0"
                ),
                vec!["120"]
            );
        }
    });
}

/// Two writers (two nodes) append to the same DEVICE queues at once in cluster mode: every
/// append gets its own sequence number, they are dense from 1, `next_seq` follows them, and an
/// append for a session no node has is dropped.
#[test]
fn two_writers_assign_device_sequences_in_sql() {
    let Some((pg, rt)) = start(2) else {
        return;
    };
    const BATCHES: usize = 200;
    const PER_BATCH: usize = 5;
    rt.block_on(async {
        let schema = "seqs";
        let a = Arc::new(open(&pg, schema, true).await);
        let b = Arc::new(open(&pg, schema, true).await);
        put_device_session(&a, "d1").await;
        put_device_session(&b, "d2").await;
        let mut tasks = Vec::new();
        for (node, store) in [("a", a.clone()), ("b", b.clone())] {
            tasks.push(tokio::spawn(async move {
                let mut waits = Vec::new();
                for i in 0..BATCHES {
                    let mut batch = WriteBatch::default();
                    for j in 0..PER_BATCH {
                        // Alternating client order within a batch: the writers must still
                        // not deadlock (sessions are locked in key order).
                        let client = if (i + j + usize::from(node == "b")) % 2 == 0 {
                            "d1"
                        } else {
                            "d2"
                        };
                        batch.push(enqueue(client, &format!("{node}-{i}-{j}")));
                    }
                    batch.push(enqueue("nobody", "dropped"));
                    waits.push(store.submit(batch));
                    if i % 16 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                for w in waits {
                    w.await.expect("writer").expect("append");
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
    });
    let total = 2 * BATCHES * PER_BATCH;
    let per_client: Vec<String> = rows(
        &pg,
        "seqs",
        "SELECT client_id, count(*), count(DISTINCT seq), min(seq), max(seq) \
         FROM device_queue GROUP BY client_id ORDER BY 1",
    );
    let half = total / 2;
    assert_eq!(
        per_client,
        vec![
            format!("d1|{half}|{half}|1|{half}"),
            format!("d2|{half}|{half}|1|{half}")
        ]
    );
    assert_eq!(
        rows(
            &pg,
            "seqs",
            "SELECT client_id, next_seq FROM sessions ORDER BY 1"
        ),
        vec![format!("d1|{}", half + 1), format!("d2|{}", half + 1)]
    );
}

fn owned(client: &str, epoch: i64) -> WriteBatch {
    WriteBatch::owned_by(Some(SessionOwner {
        client: client.into(),
        epoch,
    }))
}

fn subscription(client: &str, filter: &str) -> WriteOp {
    WriteOp::PutSubscription {
        client: client.into(),
        filter: filter.to_string(),
        options: SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            no_local: false,
            retain_as_published: false,
            retain_handling: RetainForwardRule::OnEverySubscribe,
            identifier: None,
        },
    }
}

/// Session writes carry their connection's claim epoch (cluster mode, two writers = two nodes):
/// once node B owns the session (`own_session`), node A's batches for it are refused with
/// `SessionMoved` and change nothing, also inside a group where other batches commit; B's own
/// writes go on; a stale write to a session that does not exist does not create one.
#[test]
fn session_writes_of_a_stale_owner_are_refused() {
    let Some((pg, rt)) = start(0) else {
        return;
    };
    rt.block_on(async {
        let node_a = open(&pg, "owners", true).await;
        let node_b = open(&pg, "owners", true).await;
        // A's connection (epoch 10) creates the session and subscribes.
        let mut create = owned("dev", 10);
        create.push(device_session("dev", 600, 0));
        create.push(subscription("dev", "a/before"));
        node_a
            .submit(create)
            .await
            .expect("writer")
            .expect("create");
        // The client connects to B (claim 20): B owns the session from here on.
        node_b.own_session("dev", 20).await.expect("own");

        // A, not knowing, still writes for its connection: a subscription, and its disconnect
        // with a timer. In the same group, another session's write of A's commits.
        let mut stale = owned("dev", 10);
        stale.push(subscription("dev", "a/after-takeover"));
        stale.push(WriteOp::PutTimer {
            client: "dev".into(),
            timer: SessionTimer {
                will: None,
                expires_at_ms: Some(1),
            },
        });
        let mut other = owned("other", 11);
        other.push(device_session("other", 600, 0));
        let (s, o) = (node_a.submit(stale), node_a.submit(other));
        let (s, o) = (s.await.expect("writer"), o.await.expect("writer"));
        assert!(
            matches!(&s, Err(StorageError::SessionMoved { client, epoch: 10 }) if client == "dev"),
            "the stale owner's batch was not refused: {s:?}"
        );
        assert!(o.is_ok(), "the other session's batch failed: {o:?}");

        // B writes on.
        let mut current = owned("dev", 20);
        current.push(subscription("dev", "b/now"));
        node_b
            .submit(current)
            .await
            .expect("writer")
            .expect("B writes");

        assert_eq!(
            rows(
                &pg,
                "owners",
                "SELECT filter FROM subscriptions WHERE client_id = 'dev' ORDER BY 1"
            ),
            vec!["a/before", "b/now"]
        );
        assert_eq!(
            rows(&pg, "owners", "SELECT count(*) FROM session_timers"),
            vec!["0"],
            "the stale timer was not stored"
        );
        assert_eq!(
            rows(
                &pg,
                "owners",
                "SELECT owner_epoch FROM sessions WHERE client_id = 'dev'"
            ),
            vec!["20"]
        );

        // A stale write for a session that is gone does not bring it back.
        let mut delete = owned("dev", 30);
        delete.push(WriteOp::DeleteSession {
            client: "dev".into(),
        });
        node_b
            .submit(delete)
            .await
            .expect("writer")
            .expect("delete");
        let mut late = owned("dev", 20);
        late.push(subscription("dev", "b/late"));
        let late = node_b.submit(late).await.expect("writer");
        assert!(
            matches!(late, Err(StorageError::SessionMoved { .. })),
            "{late:?}"
        );
        assert_eq!(
            rows(
                &pg,
                "owners",
                "SELECT count(*) FROM subscriptions WHERE client_id = 'dev'"
            ),
            vec!["0"]
        );
    });
}

/// Due session timers are claimed by one node at a time (`FOR UPDATE SKIP LOCKED` plus a
/// lease): two nodes polling together get disjoint sets covering every due timer; a timer
/// whose client came back (`own_session`) cannot be finished by the claim taken before; an
/// expiry deletes the session; a lapsed claim is taken again and the old claim's finish is
/// void.
#[test]
fn due_session_timers_are_claimed_once_across_nodes() {
    let Some((pg, rt)) = start(2) else {
        return;
    };
    rt.block_on(async {
        let node_a = Arc::new(open(&pg, "timers", true).await);
        let node_b = Arc::new(open(&pg, "timers", true).await);
        let now = 1_000_000u64;
        for i in 0..200 {
            let client = format!("c{i}");
            let mut batch = owned(&client, 1);
            batch.push(device_session(&client, 5, now - 5_000));
            batch.push(WriteOp::PutTimer {
                client: client.as_str().into(),
                timer: SessionTimer {
                    will: None,
                    // Half due, half not yet.
                    expires_at_ms: Some(if i % 2 == 0 { now } else { now + 60_000 }),
                },
            });
            node_a.submit(batch).await.expect("writer").expect("timer");
        }
        // Both nodes poll at once, a few timers per claim, until nothing is left.
        let drain = |store: &Arc<PgStore>| {
            let store = store.clone();
            async move {
                let mut claimed = Vec::new();
                loop {
                    let got = store.claim_due_timers(now, 7, 30_000).await.expect("claim");
                    if got.is_empty() {
                        return claimed;
                    }
                    claimed.extend(got);
                }
            }
        };
        let (a, b) = tokio::join!(tokio::spawn(drain(&node_a)), tokio::spawn(drain(&node_b)));
        let (a, b) = (a.expect("node a"), b.expect("node b"));
        let mut all: Vec<&str> = a.iter().chain(&b).map(|t| &*t.client).collect();
        all.sort_unstable();
        let before = all.len();
        all.dedup();
        assert_eq!(before, all.len(), "a timer was claimed by both nodes");
        assert_eq!(all.len(), 100, "every due timer claimed, none early");
        eprintln!("node a claimed {}, node b {}", a.len(), b.len());

        // c0 comes back before its claim is finished: the finish changes nothing.
        let c0 = a.iter().chain(&b).find(|t| &*t.client == "c0").expect("c0");
        node_b.own_session("c0", 2).await.expect("own");
        assert!(!node_a.finish_timer(c0).await.expect("finish c0"));
        // The others expire: their sessions are deleted.
        for timer in a.iter().chain(&b).filter(|t| &*t.client != "c0") {
            assert!(timer.expires);
            assert!(node_a.finish_timer(timer).await.expect("finish"));
        }
        assert_eq!(
            rows(&pg, "timers", "SELECT count(*) FROM sessions"),
            vec!["101"],
            "99 expired, c0 and the 100 not due remain"
        );

        // A claim that lapses (its node died) is taken again later; the first claim is void.
        let later = now + 60_000;
        let first = node_a
            .claim_due_timers(later, 1_000, 1_000)
            .await
            .expect("claim");
        assert_eq!(first.len(), 100, "the rest are due now");
        assert!(node_b
            .claim_due_timers(later + 500, 1_000, 1_000)
            .await
            .expect("claim while held")
            .is_empty());
        let again = node_b
            .claim_due_timers(later + 2_000, 1_000, 1_000)
            .await
            .expect("claim again");
        assert_eq!(again.len(), 100, "every lapsed claim is taken again");
        assert!(!node_a.finish_timer(&first[0]).await.expect("finish void"));
        assert!(node_b.finish_timer(&again[0]).await.expect("finish"));
    });
}
