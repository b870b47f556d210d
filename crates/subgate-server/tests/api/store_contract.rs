//! The `Store` contract, run against both implementations through the trait alone: what the
//! services rely on (atomic writes, no lost updates, one row per store transaction, detached
//! history, paging for copy-store), independent of HTTP.

use crate::common::{pg_connect, start_of_test_time, Backend, TestDb};
use chrono::Duration;
use futures_util::future::join_all;
use std::sync::Arc;
use subgate_core::error::ApiError;
use subgate_core::events::{EventType, NewEvent};
use subgate_core::model::{
    AppDefinition, AttributeValue, Environment, Price, Profile, ProfileDoc, ProfileKey,
    ProfileState, PurchaseType, Transaction,
};
use subgate_core::store::{
    ChainRef, Change, Counts, Decide, DeliveryResult, DeliveryState, DetachedTransaction,
    ImportedProfile, Loaded, Lookup, Outcome, Store, WriteError,
};
use subgate_server::config::DatabaseSettings;
use uuid::Uuid;

async fn open(db: &TestDb) -> Arc<dyn Store> {
    let store = subgate_server::open_store(&DatabaseSettings {
        url: db.url.clone(),
        ..DatabaseSettings::default()
    })
    .await
    .unwrap();
    store.put_apps(&[app(APP)]).await.unwrap();
    store
}

const APP: Uuid = Uuid::from_u128(0x5d3c_1c1e_9a57_4d8e_b5e2_0c9a_4a1f_2b10);

fn app(id: Uuid) -> AppDefinition {
    AppDefinition {
        id,
        name: "Contract".into(),
        access_levels: vec!["premium".into()],
        products: Vec::new(),
        custom_stores: Vec::new(),
    }
}

fn by_cuid(cuid: &str) -> Lookup {
    Lookup {
        customer_user_id: Some(cuid.into()),
        ..Lookup::default()
    }
}

fn chain(store_transaction_id: &str, original: &str) -> ChainRef {
    ChainRef {
        store: "app_store".into(),
        store_transaction_id: store_transaction_id.into(),
        store_original_transaction_id: original.into(),
    }
}

fn new_profile(cuid: &str) -> ProfileState {
    let now = start_of_test_time();
    ProfileState {
        profile: Profile {
            id: Uuid::new_v4(),
            app_id: APP,
            customer_user_id: Some(cuid.into()),
            version: 1,
            created_at: now,
            updated_at: now,
            doc: ProfileDoc::default(),
        },
        transactions: Vec::new(),
    }
}

fn transaction(profile_id: Uuid, id: &str, original: &str, usd: i64) -> Transaction {
    let at = start_of_test_time();
    Transaction {
        id: Uuid::new_v4(),
        profile_id: Some(profile_id),
        seq: 1,
        purchase_type: PurchaseType::Subscription,
        store: "app_store".into(),
        environment: Environment::Production,
        store_product_id: "com.test.monthly".into(),
        store_base_plan_id: None,
        store_transaction_id: id.into(),
        store_original_transaction_id: original.into(),
        offer: None,
        is_family_shared: false,
        price: Price {
            country: "US".into(),
            currency: "USD".into(),
            value_micros: usd,
            usd_micros: usd,
        },
        purchased_at: at,
        originally_purchased_at: Some(at),
        expires_at: Some(at + Duration::days(30)),
        refunded_at: None,
        cancellation_reason: None,
        variation_id: None,
        renew_status: Some(true),
        renew_status_changed_at: None,
        billing_issue_detected_at: None,
        grace_period_expires_at: None,
        created_at: at,
        updated_at: at,
        expiry_handled: false,
    }
}

/// The next version of a loaded profile (or a new one), as every service write makes it.
fn next(loaded: &Loaded, cuid: &str) -> ProfileState {
    match &loaded.profile {
        Some(state) => {
            let mut state = ProfileState::clone(state);
            state.profile.version += 1;
            state
        }
        None => new_profile(cuid),
    }
}

/// The backend a copy test copies into.
fn other_kind(backend: Backend) -> Backend {
    match backend {
        Backend::Sqlite => Backend::Postgres,
        Backend::Postgres => Backend::Sqlite,
    }
}

fn decide(f: impl Fn(&Loaded) -> Result<Change, ApiError> + Send + Sync + 'static) -> Decide {
    Box::new(f)
}

fn counter(state: &ProfileState) -> f64 {
    match state.profile.doc.attributes.get("n") {
        Some(AttributeValue::Number(n)) => *n,
        _ => 0.0,
    }
}

/// What the contract's writes store as a profile's answer to a read: the store keeps it opaque.
fn answer(state: &ProfileState) -> Vec<u8> {
    format!(
        "{} v{}",
        state.profile.customer_user_id.as_deref().unwrap_or("-"),
        state.profile.version
    )
    .into_bytes()
}

/// Profiles to import, each with its [`answer`].
fn imported(profiles: &[ProfileState]) -> Vec<ImportedProfile> {
    profiles
        .iter()
        .map(|state| ImportedProfile {
            rendered: Some(answer(state)),
            state: state.clone(),
        })
        .collect()
}

/// Creates `cuid`'s profile if missing, then records `tx_id` (new, or moved onto it), storing
/// its [`answer`].
async fn record(store: &dyn Store, cuid: &str, tx_id: &str, original: &str) -> Outcome {
    let cuid_owned = cuid.to_string();
    let (tx_id, original) = (tx_id.to_string(), original.to_string());
    let lookup = Lookup {
        chain: Some(chain(&tx_id, &original)),
        ..by_cuid(cuid)
    };
    store
        .write(
            APP,
            lookup,
            decide(move |loaded| {
                let mut state = next(loaded, &cuid_owned);
                let id = state.profile.id;
                let t = match loaded
                    .related
                    .iter()
                    .find(|t| t.store_transaction_id == tx_id)
                {
                    Some(existing) => Transaction {
                        profile_id: Some(id),
                        ..existing.clone()
                    },
                    None => transaction(id, &tx_id, &original, 9_990_000),
                };
                state
                    .transactions
                    .retain(|x| x.store_transaction_id != t.store_transaction_id);
                state.transactions.push(Arc::new(t.clone()));
                let rendered = Some(answer(&state));
                Ok(Change::Save {
                    state,
                    transactions: vec![t],
                    events: Vec::new(),
                    rendered,
                })
            }),
        )
        .await
        .unwrap()
}

async fn saved(outcome: Outcome) -> ProfileState {
    match outcome {
        Outcome::Saved { state, .. } => std::sync::Arc::unwrap_or_clone(state),
        other => panic!("expected a save, got {other:?}"),
    }
}

async fn writes_read_back_and_rejections_change_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = open(&db).await;
    store.ping().await.unwrap();
    let missing = store
        .load_profile(APP, &ProfileKey::CustomerUserId("nobody".into()))
        .await
        .unwrap();
    assert!(missing.is_none());

    saved(record(&*store, "alice", "t1", "t1").await).await;
    let written = saved(record(&*store, "alice", "t2", "t1").await).await;
    for key in [
        ProfileKey::Id(written.profile.id),
        ProfileKey::CustomerUserId("alice".into()),
    ] {
        let read = store.load_profile(APP, &key).await.unwrap().unwrap();
        assert_eq!(*read, written);
        let ids: Vec<_> = read
            .transactions
            .iter()
            .map(|t| t.store_transaction_id.as_str())
            .collect();
        assert_eq!(ids, ["t1", "t2"], "transactions keep their recorded order");
    }
    // Apps are isolated: the same customer user id in another app is someone else.
    let other_app = store
        .load_profile(Uuid::new_v4(), &ProfileKey::CustomerUserId("alice".into()))
        .await
        .unwrap();
    assert!(other_app.is_none());

    // A rejected decision writes nothing, even when it is asked to after a load.
    let rejected = store
        .write(
            APP,
            by_cuid("alice"),
            decide(|_| Err(ApiError::invalid("x", "no"))),
        )
        .await;
    assert!(matches!(rejected, Err(WriteError::Rejected(_))));
    // Keep answers with what was loaded.
    let kept = store
        .write(APP, by_cuid("alice"), decide(|_| Ok(Change::Keep)))
        .await
        .unwrap();
    assert!(matches!(kept, Outcome::Kept(Some(ref s)) if **s == written));
    assert_eq!(
        store.counts().await.unwrap(),
        Counts {
            apps: 1,
            profiles: 1,
            transactions: 2,
            events: 0
        }
    );
}

async fn lookups_report_owners_chains_and_detached_history(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = open(&db).await;
    let alice = saved(record(&*store, "alice", "a1", "a1").await).await;
    let bob = saved(record(&*store, "bob", "b1", "b1").await).await;

    // By profile id, with a customer user id someone else holds: the owner is reported.
    let lookup = Lookup {
        profile_id: Some(bob.profile.id),
        customer_user_id: Some("alice".into()),
        chain: Some(chain("a2", "a1")),
    };
    let seen = Arc::new(std::sync::Mutex::new(None));
    let seen_in = seen.clone();
    store
        .write(
            APP,
            lookup,
            decide(move |loaded| {
                *seen_in.lock().unwrap() = Some(loaded.clone());
                Ok(Change::Keep)
            }),
        )
        .await
        .unwrap();
    let loaded = seen.lock().unwrap().take().unwrap();
    assert_eq!(loaded.profile.unwrap().profile.id, bob.profile.id);
    assert_eq!(loaded.customer_user_id_owner, Some(alice.profile.id));
    assert_eq!(loaded.related.len(), 1, "the chain a1 lives on alice");
    assert_eq!(loaded.related[0].profile_id, Some(alice.profile.id));

    // Deleting alice detaches her history; the chain still finds it, on no profile.
    store
        .write(
            APP,
            by_cuid("alice"),
            decide(|loaded| {
                Ok(Change::Delete {
                    profile: loaded.profile.as_ref().unwrap().profile.clone(),
                })
            }),
        )
        .await
        .unwrap();
    let gone = store
        .load_profile(APP, &ProfileKey::Id(alice.profile.id))
        .await
        .unwrap();
    assert!(gone.is_none());
    let detached = store.detached_after(None, 10).await.unwrap();
    assert_eq!(detached.len(), 1);
    assert_eq!(detached[0].app_id, APP);
    assert_eq!(detached[0].transaction.store_transaction_id, "a1");
    assert_eq!(detached[0].transaction.profile_id, None);

    // Posting the chain again re-attaches it to whoever posts it.
    let carol = saved(record(&*store, "carol", "a1", "a1").await).await;
    assert_eq!(carol.transactions.len(), 1);
    assert!(store.detached_after(None, 10).await.unwrap().is_empty());
    assert_eq!(store.counts().await.unwrap().transactions, 2);
}

/// A profile deleted while another profile restores its chain: whichever runs first, the
/// transaction ends on the other profile alone, neither detached nor still listed by the
/// deleted one. On PostgreSQL the two nearly always deadlock (the delete takes the profile's
/// row, then the transaction's; the move the transaction's, then its former owner's), and
/// one of them runs again after `deadlock_timeout` (1 s by default): hence few rounds.
async fn a_profile_deleted_while_its_chain_moves_away_leaves_one_owner(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = open(&db).await;
    const ROUNDS: usize = 3;
    for round in 0..ROUNDS {
        let (from, to, first) = (
            format!("from-{round}"),
            format!("to-{round}"),
            format!("o-{round}"),
        );
        saved(record(&*store, &from, &first, &first).await).await;
        let delete = store.write(
            APP,
            by_cuid(&from),
            decide(|loaded| {
                Ok(match &loaded.profile {
                    Some(state) => Change::Delete {
                        profile: state.profile.clone(),
                    },
                    None => Change::Keep,
                })
            }),
        );
        let restore = record(&*store, &to, &first, &first);
        let (deleted, restored) = tokio::join!(delete, restore);
        assert!(matches!(deleted, Ok(Outcome::Deleted)), "{deleted:?}");
        saved(restored).await;
        let gone = store
            .load_profile(APP, &ProfileKey::CustomerUserId(from))
            .await
            .unwrap();
        assert!(gone.is_none());
        let owner = store
            .load_profile(APP, &ProfileKey::CustomerUserId(to))
            .await
            .unwrap()
            .unwrap();
        let ids: Vec<&str> = owner
            .transactions
            .iter()
            .map(|t| t.store_transaction_id.as_str())
            .collect();
        assert_eq!(ids, [first.as_str()]);
    }
    assert!(store.detached_after(None, 100).await.unwrap().is_empty());
    assert_eq!(store.counts().await.unwrap().transactions, ROUNDS as u64);
}

async fn concurrent_writes_to_one_profile_are_never_lost(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = open(&db).await;
    saved(record(&*store, "counter", "c1", "c1").await).await;
    let writes = (0..40).map(|_| {
        let store = store.clone();
        async move {
            store
                .write(
                    APP,
                    by_cuid("counter"),
                    decide(|loaded| {
                        let mut state = next(loaded, "counter");
                        let n = counter(&state) + 1.0;
                        state
                            .profile
                            .doc
                            .attributes
                            .insert("n".into(), AttributeValue::Number(n));
                        Ok(Change::Save {
                            state,
                            transactions: Vec::new(),
                            events: Vec::new(),
                            rendered: None,
                        })
                    }),
                )
                .await
                .unwrap()
        }
    });
    join_all(writes).await;
    let state = store
        .load_profile(APP, &ProfileKey::CustomerUserId("counter".into()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(counter(&state), 40.0, "every increment saw the one before");
    assert_eq!(state.profile.version, 41);
}

async fn racing_creators_and_recorders_make_one_row_each(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = open(&db).await;
    // Twenty writers record the same new transaction for the same new user, and twenty more
    // record another new transaction for twenty different new users.
    let same = (0..20).map(|_| {
        let store = store.clone();
        async move { saved(record(&*store, "dup", "same", "same").await).await }
    });
    let shared = (0..20).map(|i| {
        let store = store.clone();
        async move { saved(record(&*store, &format!("u{i}"), "shared", "shared").await).await }
    });
    let (same, shared) = tokio::join!(join_all(same), join_all(shared));
    let first = same[0].profile.id;
    assert!(same.iter().all(|s| s.profile.id == first));
    let counts = store.counts().await.unwrap();
    assert_eq!(counts.profiles, 21);
    assert_eq!(counts.transactions, 2, "one row per store transaction");
    // The shared transaction ended on exactly one of the twenty profiles: the last writer's.
    let mut holders = 0;
    for s in &shared {
        let now = store
            .load_profile(APP, &ProfileKey::Id(s.profile.id))
            .await
            .unwrap()
            .unwrap();
        holders += now.transactions.len();
    }
    assert_eq!(holders, 1);
}

async fn pages_and_imports_copy_everything_exactly(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = open(&db).await;
    for i in 0..7 {
        record(
            &*store,
            &format!("p{i}"),
            &format!("t{i}"),
            &format!("t{i}"),
        )
        .await;
        record(
            &*store,
            &format!("p{i}"),
            &format!("r{i}"),
            &format!("t{i}"),
        )
        .await;
    }
    store
        .write(
            APP,
            by_cuid("p3"),
            decide(|loaded| {
                Ok(Change::Delete {
                    profile: loaded.profile.as_ref().unwrap().profile.clone(),
                })
            }),
        )
        .await
        .unwrap();
    let mut pages = Vec::new();
    let mut after = None;
    loop {
        let page = store.profiles_after(after, 3).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some((last.profile.app_id, last.profile.id));
        pages.push(page);
    }
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3]);
    let profiles: Vec<ProfileState> = pages.into_iter().flatten().collect();
    let mut keys: Vec<_> = profiles.iter().map(|p| p.profile.id).collect();
    keys.dedup();
    assert_eq!(keys.len(), 6, "no profile twice");
    let detached = store.detached_after(None, 100).await.unwrap();
    assert_eq!(detached.len(), 2);

    // Into a fresh store of the other kind, and back.
    let other_db = TestDb::new(other_kind(backend)).await;
    let other = open(&other_db).await;
    other
        .import(imported(&profiles), detached.clone())
        .await
        .unwrap();
    assert_eq!(other.counts().await.unwrap(), store.counts().await.unwrap());
    for p in &profiles {
        let copy = other
            .load_profile(APP, &ProfileKey::Id(p.profile.id))
            .await
            .unwrap();
        assert_eq!(copy.as_deref(), Some(p));
    }
    assert_eq!(other.detached_after(None, 100).await.unwrap(), detached);
    // Importing again replaces rather than duplicates.
    other.import(imported(&profiles), detached).await.unwrap();
    assert_eq!(other.counts().await.unwrap(), store.counts().await.unwrap());
}

/// An import that replaces rows (`copy-store --overwrite`) and gives a transaction to another
/// profile, or detaches it: the profile it leaves no longer lists it.
async fn an_import_moving_a_transaction_leaves_no_copy_behind(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = open(&db).await;
    let first = saved(record(&*store, "first", "t1", "t1").await).await;
    saved(record(&*store, "first", "t2", "t2").await).await;
    let moved = Transaction::clone(&first.transactions[0]);
    let mut second = new_profile("second");
    second.transactions = vec![Arc::new(Transaction {
        profile_id: Some(second.profile.id),
        ..moved.clone()
    })];
    let detached = DetachedTransaction {
        app_id: APP,
        transaction: Transaction {
            profile_id: None,
            ..store
                .load_profile(APP, &ProfileKey::CustomerUserId("first".into()))
                .await
                .unwrap()
                .unwrap()
                .transactions[1]
                .as_ref()
                .clone()
        },
    };
    store
        .import(
            imported(std::slice::from_ref(&second)),
            vec![detached.clone()],
        )
        .await
        .unwrap();
    let read = |cuid: &'static str| {
        let store = Arc::clone(&store);
        async move {
            store
                .load_profile(APP, &ProfileKey::CustomerUserId(cuid.into()))
                .await
                .unwrap()
                .unwrap()
        }
    };
    assert_eq!(read("first").await.transactions, Vec::new());
    assert_eq!(read("second").await.transactions, second.transactions);
    assert_eq!(
        store.detached_after(None, 10).await.unwrap(),
        vec![detached]
    );
    // Its chain now finds it on the second profile only.
    let relocated = saved(record(&*store, "second", "t1", "t1").await).await;
    assert_eq!(relocated.transactions.len(), 1);
    assert!(read("first").await.transactions.is_empty());
}

/// A PostgreSQL write cancelled while its transaction is open (its caller's timeout, a
/// dropped request) commits nothing: its connection must not go back to the pool inside that
/// transaction, where the next write's COMMIT would commit the cancelled write's rows too.
#[tokio::test]
async fn a_postgres_write_cancelled_mid_transaction_commits_nothing() {
    let db = TestDb::new(Backend::Postgres).await;
    // One connection, so a connection handed back mid-transaction is the next write's.
    let store = subgate_server::open_store(&DatabaseSettings {
        url: db.url.clone(),
        max_connections: 1,
        ..DatabaseSettings::default()
    })
    .await
    .unwrap();
    store.put_apps(&[app(APP)]).await.unwrap();
    let before = saved(record(&*store, "alice", "t1", "t1").await).await;

    // Another session inserts store transaction t2 and does not commit: the write recording
    // t2 saves the profile, then waits on the unique index at its own insert.
    let blocker = pg_connect(&db.url).await;
    blocker
        .batch_execute(&format!(
            "BEGIN; INSERT INTO transactions
                 (id, app_id, store, store_transaction_id, store_original_transaction_id, data)
             VALUES (gen_random_uuid(), '{APP}', 'app_store', 't2', 't2', '{{}}')"
        ))
        .await
        .unwrap();
    let cancelled = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        record(&*store, "alice", "t2", "t2"),
    )
    .await;
    assert!(cancelled.is_err(), "the write should have been waiting");
    // Its insert now goes through, in a transaction nobody commits.
    blocker.batch_execute("ROLLBACK").await.unwrap();

    saved(record(&*store, "bob", "b1", "b1").await).await;
    let alice = store
        .load_profile(APP, &ProfileKey::CustomerUserId("alice".into()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*alice, before, "the cancelled write was committed");
}

/// Writes `count` events onto `cuid`'s profile (created if missing), for a webhook if
/// `deliver`.
async fn add_events(store: &dyn Store, cuid: &str, count: usize, deliver: bool) {
    let cuid_owned = cuid.to_string();
    store
        .write(
            APP,
            by_cuid(cuid),
            decide(move |loaded| {
                let state = next(loaded, &cuid_owned);
                let events = (0..count)
                    .map(|i| NewEvent {
                        id: Uuid::now_v7(),
                        event_type: EventType::AccessLevelUpdated,
                        profile_id: state.profile.id,
                        environment: Environment::Production,
                        occurred_at: start_of_test_time(),
                        payload: serde_json::value::to_raw_value(
                            &serde_json::json!({"n": i, "cuid": cuid_owned}),
                        )
                        .unwrap(),
                        deliver,
                    })
                    .collect();
                Ok(Change::Save {
                    state,
                    transactions: Vec::new(),
                    events,
                    rendered: None,
                })
            }),
        )
        .await
        .unwrap();
}

/// `copy-store`'s events: read in `seq` order across the store, written into a store of the
/// other kind with their `seq` and delivery state. A webhook still pending there is claimed by
/// the new store's worker, and its next event comes after the copied ones.
async fn events_copy_with_their_order_and_delivery_state(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = open(&db).await;
    add_events(&*store, "hooked", 3, true).await;
    add_events(&*store, "quiet", 1, false).await;
    let now = start_of_test_time();
    // The first is delivered; the second fails once and waits for its retry; the third
    // waits behind it.
    let claimed = store
        .claim_events(now, now + Duration::seconds(30), 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let result = |state, status, error: Option<&str>, retry: Option<Duration>| DeliveryResult {
        state,
        status,
        error: error.map(String::from),
        next_attempt_at: retry.map(|r| now + r),
        at: now,
        attempted: true,
    };
    store
        .finish_deliveries(vec![(
            claimed[0].id,
            result(DeliveryState::Delivered, Some(200), None, None),
        )])
        .await
        .unwrap();
    let claimed = store
        .claim_events(now, now + Duration::seconds(30), 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    store
        .finish_deliveries(vec![(
            claimed[0].id,
            result(
                DeliveryState::Pending,
                None,
                Some("connection refused"),
                Some(Duration::minutes(1)),
            ),
        )])
        .await
        .unwrap();

    let mut events = store.events_after(None, 3).await.unwrap();
    let rest = store
        .events_after(events.last().map(|e| e.seq), 3)
        .await
        .unwrap();
    assert_eq!(rest.len(), 1);
    events.extend(rest);
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    let states: Vec<_> = events.iter().map(|e| (e.state, e.attempts)).collect();
    assert_eq!(
        states,
        [
            (DeliveryState::Delivered, 1),
            (DeliveryState::Pending, 1),
            (DeliveryState::Pending, 0),
            (DeliveryState::NoEndpoint, 0)
        ]
    );

    let other_db = TestDb::new(other_kind(backend)).await;
    let other = open(&other_db).await;
    other
        .import(
            imported(&store.profiles_after(None, 10).await.unwrap()),
            Vec::new(),
        )
        .await
        .unwrap();
    // Later pages first: a store numbering imported events itself would list them out of
    // their order.
    other.import_events(events[2..].to_vec()).await.unwrap();
    other.import_events(events[..2].to_vec()).await.unwrap();
    assert_eq!(other.events_after(None, 10).await.unwrap(), events);
    // Again (`--overwrite`): replaced, not doubled.
    other.import_events(events.clone()).await.unwrap();
    assert_eq!(other.counts().await.unwrap(), store.counts().await.unwrap());

    let due = other
        .claim_events(now + Duration::minutes(2), now + Duration::minutes(3), 10)
        .await
        .unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].id, events[1].id);
    add_events(&*other, "quiet", 1, false).await;
    let after = other.events_after(None, 10).await.unwrap();
    assert_eq!(after.len(), 5);
    assert!(after[4].seq > events[3].seq, "{after:?}");
}

/// A saved profile's answer reads back by either key until a write replaces or drops it: a
/// save without one, or a transaction moved to another profile (the answer lists it).
async fn a_stored_answer_lasts_until_its_profile_changes(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = open(&db).await;
    let rendered = |cuid: &'static str| {
        let store = Arc::clone(&store);
        async move {
            let key = ProfileKey::CustomerUserId(cuid.into());
            let by_cuid = store.load_rendered(APP, &key).await.unwrap();
            let by_id = match store.load_profile(APP, &key).await.unwrap() {
                Some(state) => store
                    .load_rendered(APP, &ProfileKey::Id(state.profile.id))
                    .await
                    .unwrap(),
                None => None,
            };
            assert_eq!(by_cuid, by_id, "{cuid} by either key");
            by_cuid.map(|bytes| String::from_utf8(bytes).unwrap())
        }
    };
    assert_eq!(rendered("first").await, None, "no such profile");
    // The write hands back the answer it stored, for its own response.
    match record(&*store, "first", "t1", "t1").await {
        Outcome::Saved { state, rendered } => {
            assert_eq!(rendered, Some(answer(&state)));
            assert_eq!(rendered.as_deref(), Some(&b"first v1"[..]));
        }
        other => panic!("expected a save, got {other:?}"),
    }
    assert_eq!(rendered("first").await.as_deref(), Some("first v1"));
    saved(record(&*store, "first", "t2", "t2").await).await;
    assert_eq!(rendered("first").await.as_deref(), Some("first v2"));

    // The chain t1 moves to another profile: the first's answer still listed it.
    saved(record(&*store, "second", "t1", "t1").await).await;
    assert_eq!(rendered("second").await.as_deref(), Some("second v1"));
    assert_eq!(rendered("first").await, None);

    // A save without an answer leaves none.
    store
        .write(
            APP,
            by_cuid("second"),
            decide(|loaded| {
                Ok(Change::Save {
                    state: next(loaded, "second"),
                    transactions: Vec::new(),
                    events: Vec::new(),
                    rendered: None,
                })
            }),
        )
        .await
        .unwrap();
    assert_eq!(rendered("second").await, None);

    // A read's answer is stored only on the version it was rendered from.
    let second = store
        .load_profile(APP, &ProfileKey::CustomerUserId("second".into()))
        .await
        .unwrap()
        .unwrap();
    let (id, version) = (second.profile.id, second.profile.version);
    let renewed = |v: i64, text: &str| store.save_rendered(APP, id, v, text.as_bytes().to_vec());
    assert!(!renewed(version - 1, "stale").await.unwrap());
    assert_eq!(rendered("second").await, None);
    assert!(renewed(version, "renewed").await.unwrap());
    assert_eq!(rendered("second").await.as_deref(), Some("renewed"));
    assert!(!store
        .save_rendered(APP, Uuid::new_v4(), 1, b"nobody".to_vec())
        .await
        .unwrap());

    // An import stores the answers it is given, replacing what a row held.
    let mut third = new_profile("third");
    third.profile.version = 4;
    store.import(imported(&[third]), Vec::new()).await.unwrap();
    assert_eq!(rendered("third").await.as_deref(), Some("third v4"));
}

on_every_backend!(
    a_stored_answer_lasts_until_its_profile_changes,
    events_copy_with_their_order_and_delivery_state,
    an_import_moving_a_transaction_leaves_no_copy_behind,
    writes_read_back_and_rejections_change_nothing,
    lookups_report_owners_chains_and_detached_history,
    a_profile_deleted_while_its_chain_moves_away_leaves_one_owner,
    concurrent_writes_to_one_profile_are_never_lost,
    racing_creators_and_recorders_make_one_row_each,
    pages_and_imports_copy_everything_exactly,
);
