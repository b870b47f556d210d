use super::*;
use crate::fixtures::*;
use crate::model::{Offer, Transaction};
use serde_json::json;

/// The payload as a receiver parses it.
fn payload(e: &NewEvent) -> Value {
    serde_json::from_str(e.payload.get()).unwrap()
}

fn types(events: &[NewEvent]) -> Vec<&'static str> {
    events.iter().map(|e| e.event_type.as_str()).collect()
}

/// The events of recording `recorded` (over `previous`) into a profile that had `before`.
fn record(
    before: Vec<Transaction>,
    previous: Option<&Transaction>,
    recorded: Transaction,
    now: u32,
) -> Vec<NewEvent> {
    let app = app();
    let old = state(before.clone(), vec![], vec![]);
    let mut after_transactions: Vec<Transaction> = before
        .iter()
        .filter(|t| t.store_transaction_id != recorded.store_transaction_id)
        .cloned()
        .collect();
    after_transactions.push(recorded.clone());
    let new = state(after_transactions, vec![], vec![]);
    let mut builder = EventBuilder::new(&app, &new, at(now));
    builder.transaction_recorded(previous, &recorded, &before);
    builder.access_changes(Some(&old), None);
    builder.finish().unwrap()
}

fn trial(id: &str) -> Transaction {
    Transaction {
        offer: Some(Offer {
            category: "introductory".into(),
            offer_type: "free_trial".into(),
            id: None,
        }),
        ..sub(id, 1, 1, 8)
    }
}

/// `t` refunded on day 5.
fn refund_of(t: &Transaction) -> Transaction {
    Transaction {
        refunded_at: Some(at(5)),
        cancellation_reason: Some("refund".into()),
        ..t.clone()
    }
}

#[test]
fn first_purchase_renewal_and_repost() {
    let s1 = sub("s1", 1, 1, 20);
    assert_eq!(
        types(&record(vec![], None, s1.clone(), 1)),
        ["subscription_started", "access_level_updated"]
    );
    let s2 = sub("s2", 2, 19, 30);
    assert_eq!(
        types(&record(vec![s1.clone()], None, s2.clone(), 19)),
        ["subscription_renewed", "access_level_updated"]
    );
    // The same transaction again, unchanged: nothing.
    assert!(record(vec![s1.clone(), s2.clone()], Some(&s2), s2.clone(), 19).is_empty());
}

#[test]
fn trials_convert_and_cancellations_follow_the_offer() {
    let t1 = trial("t1");
    assert_eq!(
        types(&record(vec![], None, t1.clone(), 1)),
        ["trial_started", "access_level_updated"]
    );
    let off = Transaction {
        renew_status: Some(false),
        ..t1.clone()
    };
    assert_eq!(
        types(&record(vec![t1.clone()], Some(&t1), off.clone(), 2)),
        ["trial_renewal_cancelled", "access_level_updated"]
    );
    assert_eq!(
        types(&record(vec![off.clone()], Some(&off), t1.clone(), 3)),
        ["trial_renewal_reactivated", "access_level_updated"]
    );
    let paid = sub("p1", 2, 8, 30);
    assert_eq!(
        types(&record(vec![t1], None, paid, 8)),
        ["trial_converted", "access_level_updated"]
    );
}

#[test]
fn refunds_billing_issues_and_payload_shape() {
    let s1 = sub("s1", 1, 1, 20);
    let refunded = refund_of(&s1);
    let events = record(vec![s1.clone()], Some(&s1), refunded, 6);
    assert_eq!(
        types(&events),
        ["subscription_refunded", "access_level_updated"]
    );
    let level = &payload(&events[1])["event_properties"];
    assert_eq!(level["is_refund"], true);
    assert_eq!(level["is_active"], false);

    let troubled = Transaction {
        billing_issue_detected_at: Some(at(19)),
        grace_period_expires_at: Some(at(25)),
        ..s1.clone()
    };
    let events = record(vec![s1.clone()], Some(&s1), troubled, 19);
    assert_eq!(
        types(&events),
        [
            "billing_issue_detected",
            "entered_grace_period",
            "access_level_updated"
        ]
    );
    let payload = payload(&events[0]);
    assert_eq!(payload["event_api_version"], 1);
    assert_eq!(payload["profiles_sharing_access_level"], json!([]));
    assert_eq!(payload["event_type"], "billing_issue_detected");
    assert_eq!(
        payload["event_properties"]["profile_event_id"],
        json!(events[0].id)
    );
    assert_eq!(payload["event_properties"]["transaction_id"], "s1");
}

#[test]
fn expiry_names_the_reason() {
    let app = app();
    let mut lapsed = sub("s1", 1, 1, 20);
    lapsed.renew_status = Some(false);
    let s = state(vec![lapsed.clone()], vec![], vec![]);
    let mut builder = EventBuilder::new(&app, &s, at(21));
    builder.expired(&lapsed);
    builder.access_ended("premium");
    let events = builder.finish().unwrap();
    assert_eq!(
        types(&events),
        ["subscription_expired", "access_level_updated"]
    );
    assert_eq!(
        payload(&events[0])["event_properties"]["cancellation_reason"],
        "voluntarily_cancelled"
    );
    assert_eq!(lapsed.expiry_due_at(), Some(at(20)));
    let handled = Transaction {
        expiry_handled: true,
        ..lapsed
    };
    assert_eq!(handled.expiry_due_at(), None);
}

/// Serialized field by field, the transaction's and the level's `cancellation_reason` could
/// both be written; a receiver's parser would then keep either. Re-serialized from the parsed
/// value, a payload that named a key twice comes out shorter.
#[test]
fn payloads_name_each_key_once() {
    let s1 = sub("s1", 1, 1, 20);
    let refunded = refund_of(&s1);
    let events = record(vec![s1.clone()], Some(&s1), refunded, 6);
    let level = payload(&events[1]);
    assert_eq!(level["event_properties"]["transaction_id"], "s1");
    assert_eq!(level["event_properties"]["access_level_id"], "premium");
    for e in events.iter().chain(&record(vec![], None, s1, 1)) {
        let text = e.payload.get();
        assert_eq!(payload(e).to_string().len(), text.len(), "{text}");
    }
}
