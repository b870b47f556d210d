//! Profiles, transactions and apps for the unit tests of the domain rules.

use crate::model::*;
use chrono::{DateTime, TimeZone, Utc};
use std::collections::BTreeMap;
use std::sync::Arc;
use uuid::Uuid;

pub fn at(day: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 1, day, 0, 0, 0).unwrap()
}

pub fn app() -> App {
    App::new(AppDefinition {
        id: Uuid::nil(),
        name: "t".into(),
        access_levels: vec!["premium".into(), "pro".into()],
        products: vec![
            Product {
                id: "monthly".into(),
                access_level_id: Some("premium".into()),
                kind: ProductKind::Subscription,
                store_product_ids: BTreeMap::from([("app_store".into(), "m".into())]),
            },
            Product {
                id: "coins".into(),
                access_level_id: Some("premium".into()),
                kind: ProductKind::Consumable,
                store_product_ids: BTreeMap::from([("app_store".into(), "coins".into())]),
            },
        ],
        custom_stores: vec![],
    })
}

pub fn sub(id: &str, seq: i64, from: u32, to: u32) -> Transaction {
    Transaction {
        id: Uuid::new_v4(),
        profile_id: None,
        seq,
        purchase_type: PurchaseType::Subscription,
        store: "app_store".into(),
        environment: Environment::Production,
        store_product_id: "m".into(),
        store_base_plan_id: None,
        store_transaction_id: id.into(),
        store_original_transaction_id: "orig".into(),
        offer: None,
        is_family_shared: false,
        price: Price {
            country: "US".into(),
            currency: "USD".into(),
            value_micros: 1,
            usd_micros: 1,
        },
        purchased_at: at(from),
        originally_purchased_at: Some(at(from)),
        expires_at: Some(at(to)),
        refunded_at: None,
        cancellation_reason: None,
        variation_id: None,
        renew_status: Some(true),
        renew_status_changed_at: None,
        billing_issue_detected_at: None,
        grace_period_expires_at: None,
        created_at: at(from),
        updated_at: at(from),
        expiry_handled: false,
    }
}

pub fn grant(seq: i64, from: u32, to: Option<u32>) -> Grant {
    Grant {
        id: Uuid::new_v4(),
        access_level_id: "premium".into(),
        starts_at: at(from),
        expires_at: to.map(at),
        created_at: at(from),
        seq,
        purchase: None,
    }
}

pub fn revoke(seq: i64, when: u32) -> Revoke {
    Revoke {
        access_level_id: "premium".into(),
        revoke_at: at(when),
        created_at: at(when),
        seq,
    }
}

pub fn state(
    transactions: Vec<Transaction>,
    grants: Vec<Grant>,
    revokes: Vec<Revoke>,
) -> ProfileState {
    ProfileState {
        profile: Profile {
            id: Uuid::nil(),
            app_id: Uuid::nil(),
            customer_user_id: None,
            version: 10,
            created_at: at(1),
            updated_at: at(1),
            doc: ProfileDoc {
                grants,
                revokes,
                ..ProfileDoc::default()
            },
        },
        transactions: transactions.into_iter().map(Arc::new).collect(),
    }
}
