//! Starting runs from restore signals against the SQLite store and the in-process queue.

use jiff::Timestamp;
use relink_core::notify::{EnvRef, Notice};
use relink_core::ports::ProgressStore;
use relink_core::trigger::{Started, start_run};
use relink_embedded::{MemQueue, SqliteStore};

fn notice(operation_id: &str) -> Notice {
    Notice {
        source: "notification-generic",
        environment: EnvRef::Registry("ignored".into()),
        operation: "refresh".into(),
        operation_id: operation_id.into(),
    }
}

#[tokio::test]
async fn one_build_id_for_two_environments_starts_two_runs_and_a_replay_none() {
    let (store, queue) = (SqliteStore::in_memory().unwrap(), MemQueue::default());
    let n = notice("build-4711");
    let a = start_run(&store, &queue, "env-a", &n, Timestamp::now())
        .await
        .unwrap();
    let b = start_run(&store, &queue, "env-b", &n, Timestamp::now())
        .await
        .unwrap();
    let (Started::New(a), Started::New(b)) = (a, b) else {
        panic!("both environments get a run");
    };
    assert_ne!(a, b);
    let first = queue.pop().unwrap();
    let second = queue.pop().unwrap();
    assert_eq!(
        (
            first.environment_id.as_str(),
            second.environment_id.as_str()
        ),
        ("env-a", "env-b")
    );
    // The first event's run now exists (the handler created it); a replay is a duplicate.
    store
        .create_run(&relink_core::model::Run::new(
            a.clone(),
            "env-a".into(),
            Default::default(),
            Default::default(),
        ))
        .await
        .unwrap();
    let again = start_run(&store, &queue, "env-a", &n, Timestamp::now())
        .await
        .unwrap();
    assert_eq!(again, Started::Seen(a));
    assert!(queue.pop().is_none());
}

#[tokio::test]
async fn a_claim_whose_event_was_never_sent_is_sent_again_on_retry() {
    let (store, queue) = (SqliteStore::in_memory().unwrap(), MemQueue::default());
    // The process died after claiming the signal and before sending: only the claim is left.
    store
        .claim_trigger(
            "notification-generic",
            "env-a/op-9",
            "01JDQ4N9Z3W8B7C6X5V4T3S2R9",
        )
        .await
        .unwrap()
        .unwrap();
    let retry = start_run(&store, &queue, "env-a", &notice("op-9"), Timestamp::now())
        .await
        .unwrap();
    assert_eq!(retry, Started::New("01JDQ4N9Z3W8B7C6X5V4T3S2R9".into()));
    let sent = queue.pop().expect("the run's first event is sent");
    assert_eq!(sent.run_id.as_deref(), Some("01JDQ4N9Z3W8B7C6X5V4T3S2R9"));
    assert_eq!(sent.environment_id, "env-a");
}
