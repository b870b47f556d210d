//! Seeding through the store's bulk import: the same rows the API would write, without the
//! per-request cost, so a million profiles take minutes.

use chrono::{DateTime, Duration, SubsecRound, Utc};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use subgate_core::model::{
    App, AppDefinition, AttributeValue, Environment, Grant, Price, Profile, ProfileDoc,
    ProfileState, PurchaseType, Transaction,
};
use subgate_core::service::ProfileRenderer;
use subgate_core::store::{ImportedProfile, Store};
use subgate_server::http::rendered::RenderedProfiles;
use uuid::Uuid;

const BATCH: u64 = 2_000;

/// The stores keep microseconds: a seeded profile reads back as it was made.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

pub fn customer_user_id(i: u64) -> String {
    format!("user-{i}")
}

fn transaction(profile_id: Uuid, id: String, kind: PurchaseType, product: &str) -> Transaction {
    let now = now();
    let subscription = kind == PurchaseType::Subscription;
    Transaction {
        id: Uuid::now_v7(),
        profile_id: Some(profile_id),
        seq: 1,
        purchase_type: kind,
        store: "app_store".into(),
        environment: Environment::Production,
        store_product_id: product.into(),
        store_base_plan_id: None,
        store_transaction_id: id.clone(),
        store_original_transaction_id: id,
        offer: None,
        is_family_shared: false,
        price: Price {
            country: "US".into(),
            currency: "USD".into(),
            value_micros: 9_990_000,
            usd_micros: 9_990_000,
        },
        purchased_at: now - Duration::days(3),
        originally_purchased_at: Some(now - Duration::days(3)),
        // A year ahead, so the benchmark's expiry worker has nothing to do.
        expires_at: subscription.then(|| now + Duration::days(365)),
        refunded_at: None,
        cancellation_reason: None,
        variation_id: None,
        renew_status: subscription.then_some(true),
        renew_status_changed_at: None,
        billing_issue_detected_at: None,
        grace_period_expires_at: None,
        created_at: now,
        updated_at: now,
        expiry_handled: false,
    }
}

/// A profile as a real one looks after a few weeks: attributes, a subscription, a one-time
/// purchase and a promotional grant.
pub fn profile(app_id: Uuid, i: u64) -> ProfileState {
    let now = now();
    let id = Uuid::now_v7();
    let attributes = BTreeMap::from([
        ("plan".to_string(), AttributeValue::Text("gold".into())),
        (
            "words_learned".to_string(),
            AttributeValue::Number((i % 1000) as f64),
        ),
        (
            "cohort".to_string(),
            AttributeValue::Text(format!("c{}", i % 12)),
        ),
    ]);
    ProfileState {
        profile: Profile {
            id,
            app_id,
            customer_user_id: Some(customer_user_id(i)),
            version: 3,
            created_at: now,
            updated_at: now,
            doc: ProfileDoc {
                attributes,
                grants: vec![Grant {
                    id: Uuid::new_v4(),
                    access_level_id: "pro".into(),
                    starts_at: now,
                    expires_at: Some(now + Duration::days(30)),
                    created_at: now,
                    seq: 3,
                    purchase: None,
                }],
                ..ProfileDoc::default()
            },
        },
        transactions: vec![
            Arc::new(transaction(
                id,
                format!("seed-sub-{i}"),
                PurchaseType::Subscription,
                "com.bench.monthly",
            )),
            Arc::new(transaction(
                id,
                format!("seed-life-{i}"),
                PurchaseType::OneTimePurchase,
                "com.bench.lifetime",
            )),
        ],
    }
}

/// Writes `count` profiles, each with its answer to a read as a write would store it; returns
/// the seconds it took.
pub async fn seed(store: &dyn Store, app: &AppDefinition, count: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let renderer = RenderedProfiles::new(&[Arc::new(App::new(app.clone()))]);
    let mut next = 0;
    while next < count {
        let end = (next + BATCH).min(count);
        let batch = (next..end)
            .map(|i| {
                let state = profile(app.id, i);
                ImportedProfile {
                    rendered: renderer.render(&state, now()),
                    state,
                }
            })
            .collect();
        store.import(batch, Vec::new()).await?;
        next = end;
        if next % 100_000 == 0 {
            eprintln!(
                "  seeded {next} profiles ({:.0}/s)",
                next as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(started.elapsed().as_secs_f64())
}
