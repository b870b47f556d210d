//! Domain types. Profiles are stored as one document (fields, attributes, grants, revokes) plus
//! their transactions, so that a profile read is two indexed lookups and a profile write is one
//! row version bump.

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use uuid::Uuid;

/// Stores every app knows without configuration.
pub const BUILTIN_STORES: &[&str] = &["app_store", "play_store", "stripe", "paddle", "adapty"];

/// A map hashed with foldhash (randomly seeded per process), for lookups on every read:
/// std's SipHash was a few percent of a cached profile read.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The access level every app has.
pub const DEFAULT_ACCESS_LEVEL: &str = "premium";

/// Store and product shown for access given by a grant, as Adapty shows server-side grants.
pub const GRANT_STORE: &str = "adapty";
pub const GRANT_PRODUCT_ID: &str = "adapty_server_side_product";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProductKind {
    Subscription,
    OneTime,
    Consumable,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Product {
    pub id: String,
    pub access_level_id: Option<String>,
    pub kind: ProductKind,
    /// Store name (`app_store`, `play_store`, `stripe` or a custom store id) to that store's
    /// product id.
    pub store_product_ids: BTreeMap<String, String>,
}

/// An app as declared in the configuration: its access levels, products and custom stores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppDefinition {
    pub id: Uuid,
    pub name: String,
    pub access_levels: Vec<String>,
    pub products: Vec<Product>,
    pub custom_stores: Vec<String>,
}

/// An app with its lookups built once.
#[derive(Debug, Clone)]
pub struct App {
    pub definition: AppDefinition,
    /// Store, then store product id, to the product's index: nested so that a lookup by two
    /// `&str` allocates nothing (a read looks up every transaction's product).
    products_by_store_id: FastMap<String, FastMap<String, usize>>,
    /// Whether the app has a webhook: events of an app without one are stored as already
    /// settled (`no_endpoint`) rather than queued for a worker to settle one by one.
    pub has_webhook: bool,
}

impl App {
    pub fn new(mut definition: AppDefinition) -> Self {
        if !definition
            .access_levels
            .iter()
            .any(|l| l == DEFAULT_ACCESS_LEVEL)
        {
            definition
                .access_levels
                .insert(0, DEFAULT_ACCESS_LEVEL.to_string());
        }
        let mut products_by_store_id: FastMap<String, FastMap<String, usize>> = FastMap::default();
        for (index, product) in definition.products.iter().enumerate() {
            for (store, store_product_id) in &product.store_product_ids {
                products_by_store_id
                    .entry(store.clone())
                    .or_default()
                    .insert(store_product_id.clone(), index);
            }
        }
        Self {
            definition,
            products_by_store_id,
            has_webhook: false,
        }
    }

    pub fn with_webhook(mut self, has_webhook: bool) -> Self {
        self.has_webhook = has_webhook;
        self
    }

    pub fn id(&self) -> Uuid {
        self.definition.id
    }

    pub fn has_access_level(&self, id: &str) -> bool {
        self.definition.access_levels.iter().any(|l| l == id)
    }

    pub fn knows_store(&self, store: &str) -> bool {
        BUILTIN_STORES.contains(&store) || self.definition.custom_stores.iter().any(|s| s == store)
    }

    pub fn product(&self, store: &str, store_product_id: &str) -> Option<&Product> {
        let index = *self
            .products_by_store_id
            .get(store)?
            .get(store_product_id)?;
        self.definition.products.get(index)
    }
}

/// How a request names its profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProfileKey {
    Id(Uuid),
    CustomerUserId(String),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum AttributeValue {
    Number(f64),
    Text(String),
}

/// What `#[serde(untagged)]` would read (a number, else a string), without buffering each
/// value first to try the variants in turn: that buffering, and the error message it built
/// for every text value, were a tenth of decoding a stored profile.
impl<'de> Deserialize<'de> for AttributeValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Value;

        impl serde::de::Visitor<'_> for Value {
            type Value = AttributeValue;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number or a string")
            }

            fn visit_f64<E>(self, n: f64) -> Result<AttributeValue, E> {
                Ok(AttributeValue::Number(n))
            }

            fn visit_i64<E>(self, n: i64) -> Result<AttributeValue, E> {
                Ok(AttributeValue::Number(n as f64))
            }

            fn visit_u64<E>(self, n: u64) -> Result<AttributeValue, E> {
                Ok(AttributeValue::Number(n as f64))
            }

            fn visit_str<E>(self, s: &str) -> Result<AttributeValue, E> {
                Ok(AttributeValue::Text(s.to_owned()))
            }

            fn visit_string<E>(self, s: String) -> Result<AttributeValue, E> {
                Ok(AttributeValue::Text(s))
            }
        }

        d.deserialize_any(Value)
    }
}

/// The personal fields of a profile; `None` is "not set".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProfileFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gender: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub birthday: Option<NaiveDate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_country: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_v4_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_country: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analytics_disabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub att_status: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_account_token: Option<String>,
}

/// Access given without a transaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grant {
    pub id: Uuid,
    pub access_level_id: String,
    #[serde(with = "crate::time::stored")]
    pub starts_at: DateTime<Utc>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::time::stored::option"
    )]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(with = "crate::time::stored")]
    pub created_at: DateTime<Utc>,
    /// Write sequence number in the profile: a revoke caps only sources older than itself.
    pub seq: i64,
    /// What the grant says it stands for (v1 grants may name a store purchase); shown in place
    /// of the server-side product.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purchase: Option<GrantPurchase>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrantPurchase {
    pub store: String,
    pub vendor_product_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_plan_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor_transaction_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor_original_transaction_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub introductory_offer_type: Option<String>,
    pub environment: Environment,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revoke {
    pub access_level_id: String,
    #[serde(with = "crate::time::stored")]
    pub revoke_at: DateTime<Utc>,
    #[serde(with = "crate::time::stored")]
    pub created_at: DateTime<Utc>,
    pub seq: i64,
}

/// Everything about a profile except its transactions, stored as one document.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProfileDoc {
    pub fields: ProfileFields,
    pub attributes: BTreeMap<String, AttributeValue>,
    /// The last installation meta posted, as posted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installation_meta: Option<serde_json::Map<String, serde_json::Value>>,
    /// The last `adapty-platform` header seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    pub grants: Vec<Grant>,
    pub revokes: Vec<Revoke>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub id: Uuid,
    pub app_id: Uuid,
    pub customer_user_id: Option<String>,
    /// Bumped by every write; also the sequence number handed to what that write adds.
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub doc: ProfileDoc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PurchaseType {
    Subscription,
    OneTimePurchase,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Environment {
    Production,
    Sandbox,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Production => "Production",
            Environment::Sandbox => "Sandbox",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "Production" => Some(Environment::Production),
            "Sandbox" => Some(Environment::Sandbox),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    pub category: String,
    #[serde(rename = "type")]
    pub offer_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Price {
    pub country: String,
    pub currency: String,
    /// Millionths of the currency unit, so that sums are exact.
    pub value_micros: i64,
    /// The same price in millionths of a US dollar, converted when the transaction was recorded.
    pub usd_micros: i64,
}

/// A purchase from any store, as recorded by set-transaction (or an import).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transaction {
    /// The `purchase_id` of a one-time purchase; stable across updates.
    pub id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_id: Option<Uuid>,
    pub seq: i64,
    pub purchase_type: PurchaseType,
    pub store: String,
    pub environment: Environment,
    pub store_product_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_base_plan_id: Option<String>,
    pub store_transaction_id: String,
    pub store_original_transaction_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offer: Option<Offer>,
    pub is_family_shared: bool,
    pub price: Price,
    #[serde(with = "crate::time::stored")]
    pub purchased_at: DateTime<Utc>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::time::stored::option"
    )]
    pub originally_purchased_at: Option<DateTime<Utc>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::time::stored::option"
    )]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::time::stored::option"
    )]
    pub refunded_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancellation_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_status: Option<bool>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::time::stored::option"
    )]
    pub renew_status_changed_at: Option<DateTime<Utc>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::time::stored::option"
    )]
    pub billing_issue_detected_at: Option<DateTime<Utc>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::time::stored::option"
    )]
    pub grace_period_expires_at: Option<DateTime<Utc>>,
    #[serde(with = "crate::time::stored")]
    pub created_at: DateTime<Utc>,
    #[serde(with = "crate::time::stored")]
    pub updated_at: DateTime<Utc>,
    /// The end of this period has been dealt with (an expiry event sent, or found superseded
    /// by a later transaction of the chain).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub expiry_handled: bool,
}

impl Transaction {
    /// Carries over from `previous` (the same store transaction before this write) whether its
    /// expiry was dealt with: it stays dealt with unless the period moved.
    pub fn keep_expiry_handled(&mut self, previous: Option<&Transaction>) {
        self.expiry_handled =
            previous.is_some_and(|p| p.expiry_handled && p.expiry_due_at() == self.expiry_due_at());
    }

    /// When the expiry worker should look at this transaction: the end of its period (grace
    /// included), unless refunded, handled already, or not a subscription.
    pub fn expiry_due_at(&self) -> Option<DateTime<Utc>> {
        if self.purchase_type != PurchaseType::Subscription
            || self.is_refunded()
            || self.expiry_handled
        {
            return None;
        }
        let end = self.expires_at?;
        Some(self.grace_period_expires_at.map_or(end, |g| g.max(end)))
    }

    pub fn is_refunded(&self) -> bool {
        self.refunded_at.is_some()
    }

    /// Past its expiry but inside the grace period the store granted after a billing issue.
    pub fn is_in_grace_period(&self, now: DateTime<Utc>) -> bool {
        self.purchase_type == PurchaseType::Subscription
            && !self.is_refunded()
            && self.billing_issue_detected_at.is_some()
            && self.grace_period_expires_at.is_some_and(|g| now < g)
            && self.expires_at.is_some_and(|e| e <= now)
    }

    /// When auto-renewal was turned off, if it is off (the write time when the store gave none).
    pub fn renewal_cancelled_at(&self) -> Option<DateTime<Utc>> {
        (self.purchase_type == PurchaseType::Subscription && self.renew_status == Some(false))
            .then(|| self.renew_status_changed_at.unwrap_or(self.updated_at))
    }

    pub fn same_chain(&self, store: &str, original_id: &str) -> bool {
        self.store == store && self.store_original_transaction_id == original_id
    }
}

/// A profile with everything a read needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileState {
    pub profile: Profile,
    /// Shared between a profile's successive states: a write that records one transaction
    /// copies the others' pointers, not their text (`Arc::make_mut` copies the one it changes).
    pub transactions: Vec<Arc<Transaction>>,
}

/// Which of a profile row's two documents a save leaves as they were: a backend's update then
/// leaves those columns out instead of encoding them again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unchanged {
    pub doc: bool,
    pub transactions: bool,
}

impl ProfileState {
    /// A profile row's transactions as decoded, each marked as `profile_id`'s: they are its by
    /// being in its row, and a moved transaction's own copy may be older. (Decoded as plain
    /// values and wrapped here: serde would build each `Arc` through a `Box`, two allocations.)
    pub fn row_transactions(profile_id: Uuid, decoded: Vec<Transaction>) -> Vec<Arc<Transaction>> {
        decoded
            .into_iter()
            .map(|t| {
                Arc::new(Transaction {
                    profile_id: Some(profile_id),
                    ..t
                })
            })
            .collect()
    }

    /// What saving `self` over `before` (its row as the write loaded it) leaves unchanged.
    /// Nothing, unless `before` is the same profile one version below: the update checks that
    /// version, so the row it replaces holds exactly `before`.
    pub fn unchanged_since(&self, before: Option<&ProfileState>) -> Unchanged {
        let p = &self.profile;
        match before.filter(|b| b.profile.id == p.id && b.profile.version == p.version - 1) {
            Some(b) => Unchanged {
                doc: b.profile.doc == p.doc,
                transactions: b.transactions == self.transactions,
            },
            None => Unchanged {
                doc: false,
                transactions: false,
            },
        }
    }

    /// Revenue of every transaction not refunded, in millionths of a dollar.
    pub fn total_revenue_usd_micros(&self) -> i64 {
        self.transactions
            .iter()
            .filter(|t| !t.is_refunded())
            .map(|t| t.price.usd_micros)
            .sum()
    }

    /// A short hash of the custom attributes: it changes whenever they change.
    pub fn segment_hash(&self) -> String {
        // Over a canonical rendering, so that it is the same in every build.
        let mut hasher = crate::fnv::Fnv1a::new();
        let mut feed = |bytes: &[u8]| hasher.write(bytes);
        for (key, value) in &self.profile.doc.attributes {
            feed(key.as_bytes());
            feed(&[0]);
            match value {
                AttributeValue::Number(n) => {
                    feed(b"n");
                    feed(&n.to_bits().to_le_bytes());
                }
                AttributeValue::Text(s) => {
                    feed(b"s");
                    feed(s.as_bytes());
                }
            }
            feed(&[0xff]);
        }
        format!("{:016x}", hasher.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{grant, state, sub};
    use serde_json::json;

    #[test]
    fn a_save_leaves_unchanged_only_what_equals_the_row_one_version_below() {
        let before = state(
            vec![sub("t1", 1, 1, 30)],
            vec![grant(2, 1, Some(7))],
            vec![],
        );
        let next = |change: &dyn Fn(&mut ProfileState)| {
            let mut after = before.clone();
            after.profile.version += 1;
            change(&mut after);
            after
        };
        let both = Unchanged {
            doc: true,
            transactions: true,
        };
        assert_eq!(next(&|_| {}).unchanged_since(Some(&before)), both);
        let granted = next(&|s| s.profile.doc.grants.push(grant(3, 2, None)));
        assert_eq!(
            granted.unchanged_since(Some(&before)),
            Unchanged {
                doc: false,
                transactions: true
            }
        );
        let recorded = next(&|s| s.transactions.push(Arc::new(sub("t2", 3, 2, 20))));
        assert_eq!(
            recorded.unchanged_since(Some(&before)),
            Unchanged {
                doc: true,
                transactions: false
            }
        );
        let nothing = Unchanged {
            doc: false,
            transactions: false,
        };
        // Not one version below, another profile, or no row loaded: everything is written.
        assert_eq!(before.unchanged_since(Some(&before)), nothing);
        let other = next(&|s| s.profile.id = Uuid::from_u128(1));
        assert_eq!(other.unchanged_since(Some(&before)), nothing);
        assert_eq!(next(&|_| {}).unchanged_since(None), nothing);
    }

    #[test]
    fn stored_documents_leave_out_unset_fields_and_read_back_those_that_wrote_them() {
        let written_by_older_versions = json!({
            "id": "0191f3a0-0000-7000-8000-000000000001",
            "profile_id": null,
            "seq": 1,
            "purchase_type": "subscription",
            "store": "app_store",
            "environment": "Production",
            "store_product_id": "monthly",
            "store_base_plan_id": null,
            "store_transaction_id": "t1",
            "store_original_transaction_id": "t1",
            "offer": null,
            "is_family_shared": false,
            "price": {"country": "US", "currency": "USD", "value_micros": 1, "usd_micros": 1},
            "purchased_at": "2026-11-01T10:00:00Z",
            "originally_purchased_at": null,
            "expires_at": "2026-12-01T10:00:00Z",
            "refunded_at": null,
            "cancellation_reason": null,
            "variation_id": null,
            "renew_status": true,
            "renew_status_changed_at": null,
            "billing_issue_detected_at": null,
            "grace_period_expires_at": null,
            "created_at": "2026-11-01T10:00:00Z",
            "updated_at": "2026-11-01T10:00:00Z",
            "expiry_handled": false
        });
        let t: Transaction = serde_json::from_value(written_by_older_versions).unwrap();
        let stored = serde_json::to_value(&t).unwrap();
        for unset in ["profile_id", "refunded_at", "offer", "expiry_handled"] {
            assert!(stored.get(unset).is_none(), "{unset} in {stored}");
        }
        assert_eq!(stored["renew_status"], json!(true));
        assert_eq!(serde_json::from_value::<Transaction>(stored).unwrap(), t);

        let doc: ProfileDoc =
            serde_json::from_value(json!({"fields": {"email": null, "gender": "f"}})).unwrap();
        assert_eq!(
            serde_json::to_value(&doc).unwrap()["fields"],
            json!({"gender": "f"})
        );
    }

    #[test]
    fn segment_hashes_are_sixteen_lowercase_hex_digits_of_fnv1a() {
        let hash_of = |attributes: &[(&str, &str)]| {
            let mut state = ProfileState {
                profile: Profile {
                    id: Uuid::nil(),
                    app_id: Uuid::nil(),
                    customer_user_id: None,
                    version: 1,
                    created_at: DateTime::UNIX_EPOCH,
                    updated_at: DateTime::UNIX_EPOCH,
                    doc: ProfileDoc::default(),
                },
                transactions: Vec::new(),
            };
            for (key, text) in attributes {
                let value = AttributeValue::Text((*text).to_string());
                state
                    .profile
                    .doc
                    .attributes
                    .insert((*key).to_string(), value);
            }
            state.segment_hash()
        };
        // FNV-1a's offset basis, as no attribute was fed.
        assert_eq!(hash_of(&[]), "cbf29ce484222325");
        assert_eq!(hash_of(&[("plan", "gold")]), "53f55583b30d45a6");
        // Leading zeros are kept.
        assert_eq!(hash_of(&[("k", "510")]), "00206dd72590ca00");
    }

    #[test]
    fn attribute_values_read_as_the_untagged_enum_they_replace_would() {
        #[derive(Debug, Deserialize)]
        #[serde(untagged)]
        enum Untagged {
            Number(f64),
            Text(String),
        }
        let same = |u: Untagged| match u {
            Untagged::Number(n) => AttributeValue::Number(n),
            Untagged::Text(s) => AttributeValue::Text(s),
        };
        for text in [
            "42",
            "-7",
            "1.5",
            "1e300",
            "18446744073709551615",
            "\"gold\"",
            "\"\"",
            "\"\\u00e9\"",
            "true",
            "null",
            "[1]",
            "{}",
        ] {
            let ours = serde_json::from_str::<AttributeValue>(text).ok();
            let theirs = serde_json::from_str::<Untagged>(text).ok().map(same);
            assert_eq!(ours, theirs, "{text}");
        }
    }
}
