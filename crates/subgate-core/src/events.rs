//! Adapty's webhook events: which change fires which event, and the payload Adapty sends.
//!
//! Events are computed inside a write's `decide`, from the state before and after it, and are
//! stored in the same database commit as the change (an outbox); a worker delivers them. This
//! module is pure: the caller passes the instant and the state.

use crate::access::{self, AccessLevelView};
use crate::error::{ApiError, ErrorCode};
use crate::model::{App, AttributeValue, Environment, ProfileState, PurchaseType, Transaction};
use crate::time::V1Date;
use chrono::{DateTime, Utc};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::BTreeMap;
use uuid::Uuid;

macro_rules! event_types {
    ($($variant:ident => $name:literal),+ $(,)?) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum EventType { $($variant),+ }

        impl EventType {
            pub const ALL: &'static [EventType] = &[$(EventType::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $(EventType::$variant => $name),+ }
            }

            pub fn parse(name: &str) -> Option<Self> {
                match name { $($name => Some(EventType::$variant),)+ _ => None }
            }
        }
    };
}

event_types! {
    SubscriptionStarted => "subscription_started",
    SubscriptionRenewed => "subscription_renewed",
    SubscriptionRenewalCancelled => "subscription_renewal_cancelled",
    SubscriptionRenewalReactivated => "subscription_renewal_reactivated",
    SubscriptionExpired => "subscription_expired",
    SubscriptionRefunded => "subscription_refunded",
    TrialStarted => "trial_started",
    TrialConverted => "trial_converted",
    TrialRenewalCancelled => "trial_renewal_cancelled",
    TrialRenewalReactivated => "trial_renewal_reactivated",
    TrialExpired => "trial_expired",
    EnteredGracePeriod => "entered_grace_period",
    BillingIssueDetected => "billing_issue_detected",
    NonSubscriptionPurchase => "non_subscription_purchase",
    NonSubscriptionPurchaseRefunded => "non_subscription_purchase_refunded",
    AccessLevelUpdated => "access_level_updated",
}

/// An event to be stored with the write that caused it.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// Also `event_properties.profile_event_id`, the receivers' deduplication key.
    pub id: Uuid,
    pub event_type: EventType,
    pub profile_id: Uuid,
    pub environment: Environment,
    pub occurred_at: DateTime<Utc>,
    /// The body Adapty would send, with the event's own name in `event_type`, as JSON text.
    pub payload: Box<RawValue>,
    /// Whether a webhook should send it (the app has one).
    pub deliver: bool,
}

pub fn is_trial(t: &Transaction) -> bool {
    t.offer
        .as_ref()
        .is_some_and(|o| o.offer_type == "free_trial")
}

fn money(micros: i64) -> f64 {
    micros as f64 / 1_000_000.0
}

/// `{}`.
struct EmptyObject;

impl Serialize for EmptyObject {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_map(Some(0))?.end()
    }
}

/// The body Adapty sends, serialized straight from the profile. Built as a
/// `serde_json::Value` first (a map per object, a `String` per key), an event took 17 µs to
/// build and serialize, about a twentieth of a recorded transaction's CPU.
#[derive(Serialize)]
struct Payload<'a> {
    profile_id: Uuid,
    customer_user_id: Option<&'a str>,
    idfv: Option<&'a Value>,
    idfa: Option<&'a Value>,
    advertising_id: Option<&'a Value>,
    profile_install_datetime: V1Date,
    user_agent: Option<&'a Value>,
    email: Option<&'a str>,
    event_type: &'static str,
    event_datetime: V1Date,
    event_api_version: u8,
    event_properties: Properties<'a>,
    profiles_sharing_access_level: [(); 0],
    user_attributes: &'a BTreeMap<String, AttributeValue>,
    attributions: EmptyObject,
    integration_ids: EmptyObject,
}

/// `event_properties`: the profile's, then the transaction's (the event's own, or the one
/// behind the level), then the level's.
struct Properties<'a> {
    event_id: Uuid,
    state: &'a ProfileState,
    now: DateTime<Utc>,
    transaction: Option<&'a Transaction>,
    level: Option<&'a AccessLevelView<'a>>,
    has_access: bool,
}

impl Serialize for Properties<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let profile = &self.state.profile;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("profile_event_id", &self.event_id)?;
        map.serialize_entry("profile_id", &profile.id)?;
        map.serialize_entry("event_datetime", &V1Date(Some(self.now)))?;
        match self.transaction {
            // Both name a `cancellation_reason`: the level's is the one sent.
            Some(t) => transaction_properties(&mut map, self.state, t, self.level.is_none())?,
            None => map.serialize_entry("environment", Environment::Production.as_str())?,
        }
        if let Some(level) = self.level {
            level_properties(&mut map, level)?;
        }
        map.serialize_entry(
            "profile_total_revenue_usd",
            &money(self.state.total_revenue_usd_micros()),
        )?;
        map.serialize_entry("profile_has_access_level", &self.has_access)?;
        map.serialize_entry("profile_country", &profile.doc.fields.ip_country)?;
        map.serialize_entry("profile_ip_address", &profile.doc.fields.ip_v4_address)?;
        map.end()
    }
}

fn meta<'a>(state: &'a ProfileState, key: &str) -> Option<&'a Value> {
    state
        .profile
        .doc
        .installation_meta
        .as_ref()
        .and_then(|m| m.get(key))
}

/// Paid transactions of the chain up to and including `t` (a trial is not a payment).
fn consecutive_payments(state: &ProfileState, t: &Transaction) -> usize {
    state
        .transactions
        .iter()
        .filter(|x| x.same_chain(&t.store, &t.store_original_transaction_id))
        .filter(|x| x.purchased_at <= t.purchased_at && !is_trial(x) && !x.is_refunded())
        .count()
}

fn transaction_properties<M: SerializeMap>(
    map: &mut M,
    state: &ProfileState,
    t: &Transaction,
    with_cancellation_reason: bool,
) -> Result<(), M::Error> {
    let offer = t.offer.as_ref();
    map.serialize_entry("store", &t.store)?;
    map.serialize_entry("store_country", &t.price.country)?;
    map.serialize_entry("environment", t.environment.as_str())?;
    map.serialize_entry("vendor_product_id", &t.store_product_id)?;
    map.serialize_entry("base_plan_id", &t.store_base_plan_id)?;
    map.serialize_entry("transaction_id", &t.store_transaction_id)?;
    map.serialize_entry("original_transaction_id", &t.store_original_transaction_id)?;
    map.serialize_entry("purchase_date", &V1Date(Some(t.purchased_at)))?;
    map.serialize_entry(
        "original_purchase_date",
        &V1Date(t.originally_purchased_at.or(Some(t.purchased_at))),
    )?;
    map.serialize_entry("subscription_expires_at", &V1Date(t.expires_at))?;
    map.serialize_entry("price_local", &money(t.price.value_micros))?;
    map.serialize_entry("price_usd", &money(t.price.usd_micros))?;
    map.serialize_entry("currency", &t.price.currency)?;
    if with_cancellation_reason {
        map.serialize_entry("cancellation_reason", &t.cancellation_reason)?;
    }
    map.serialize_entry("consecutive_payments", &consecutive_payments(state, t))?;
    map.serialize_entry("store_offer_category", &offer.map(|o| &o.category))?;
    map.serialize_entry(
        "promotional_offer_id",
        &offer
            .filter(|o| o.category == "promotional")
            .and_then(|o| o.id.as_ref()),
    )?;
    map.serialize_entry("variation_id", &t.variation_id)
}

fn level_properties<M: SerializeMap>(map: &mut M, v: &AccessLevelView<'_>) -> Result<(), M::Error> {
    let offer = v.transaction().and_then(|t| t.offer.as_ref());
    let offer_of = |category: &str| offer.filter(|o| o.category == category);
    let renewed_at = v
        .transaction()
        .filter(|t| t.store_transaction_id != t.store_original_transaction_id)
        .map(|t| t.purchased_at);
    map.serialize_entry("access_level_id", &v.access_level_id)?;
    map.serialize_entry("is_active", &v.is_active)?;
    map.serialize_entry("is_lifetime", &v.is_lifetime())?;
    map.serialize_entry("expires_at", &V1Date(v.expires_at))?;
    map.serialize_entry("will_renew", &v.will_renew)?;
    map.serialize_entry("is_in_grace_period", &v.is_in_grace_period)?;
    map.serialize_entry("is_refund", &v.is_refund)?;
    map.serialize_entry("activated_at", &V1Date(Some(v.activated_at)))?;
    map.serialize_entry("renewed_at", &V1Date(renewed_at))?;
    map.serialize_entry(
        "billing_issue_detected_at",
        &V1Date(v.billing_issue_detected_at),
    )?;
    map.serialize_entry("cancellation_reason", &v.cancellation_reason)?;
    map.serialize_entry(
        "active_introductory_offer_type",
        &offer_of("introductory").map(|o| &o.offer_type),
    )?;
    map.serialize_entry(
        "active_promotional_offer_type",
        &offer_of("promotional").map(|o| &o.offer_type),
    )?;
    map.serialize_entry(
        "active_promotional_offer_id",
        &offer_of("promotional").and_then(|o| o.id.as_ref()),
    )
}

/// Builds events for one profile at one instant.
pub struct EventBuilder<'a> {
    app: &'a App,
    state: &'a ProfileState,
    now: DateTime<Utc>,
    events: Vec<NewEvent>,
    /// `profile_has_access_level`, the same for every event of the builder: derived once.
    has_access: std::cell::OnceCell<bool>,
    /// A payload that could not be serialized fails the whole write (see [`Self::finish`]).
    unwritable: Option<serde_json::Error>,
}

impl<'a> EventBuilder<'a> {
    /// `state` is the profile after the change.
    pub fn new(app: &'a App, state: &'a ProfileState, now: DateTime<Utc>) -> Self {
        Self {
            app,
            state,
            now,
            events: Vec::new(),
            has_access: std::cell::OnceCell::new(),
            unwritable: None,
        }
    }

    /// The events, or an internal error if a payload could not be serialized (none of this
    /// module's types fails to; the write is then refused rather than its event lost).
    pub fn finish(self) -> Result<Vec<NewEvent>, ApiError> {
        match self.unwritable {
            None => Ok(self.events),
            Some(e) => Err(ApiError::with_message(
                ErrorCode::InternalServerError,
                format!("an event's payload could not be serialized: {e}"),
            )),
        }
    }

    fn push(
        &mut self,
        event_type: EventType,
        transaction: Option<&Transaction>,
        level: Option<&AccessLevelView<'_>>,
    ) {
        // Time-ordered, so the id index of the outbox only ever grows at its end.
        let id = Uuid::now_v7();
        let state = self.state;
        let profile = &state.profile;
        // The event's own transaction, or the one behind the level.
        let shown = transaction.or_else(|| level.and_then(|l| l.transaction()));
        let environment = shown.map_or(Environment::Production, |t| t.environment);
        let now = self.now;
        let has_access = *self.has_access.get_or_init(|| {
            access::derive(self.app, state, now)
                .iter()
                .any(|l| l.is_active)
        });
        let payload = Payload {
            profile_id: profile.id,
            customer_user_id: profile.customer_user_id.as_deref(),
            idfv: meta(state, "idfv"),
            idfa: meta(state, "idfa"),
            advertising_id: meta(state, "advertising_id"),
            profile_install_datetime: V1Date(Some(profile.created_at)),
            user_agent: meta(state, "user_agent"),
            email: profile.doc.fields.email.as_deref(),
            event_type: event_type.as_str(),
            event_datetime: V1Date(Some(now)),
            event_api_version: 1,
            event_properties: Properties {
                event_id: id,
                state,
                now,
                transaction: shown,
                level,
                has_access,
            },
            profiles_sharing_access_level: [],
            user_attributes: &profile.doc.attributes,
            attributions: EmptyObject,
            integration_ids: EmptyObject,
        };
        let payload = match serde_json::value::to_raw_value(&payload) {
            Ok(payload) => payload,
            Err(e) => {
                self.unwritable.get_or_insert(e);
                return;
            }
        };
        self.events.push(NewEvent {
            id,
            event_type,
            profile_id: profile.id,
            environment,
            occurred_at: now,
            payload,
            deliver: self.app.has_webhook,
        });
    }

    /// The purchase events of recording `recorded`, which replaced `previous` (the same store
    /// transaction before this write, if it existed). `chain_before` is the rest of its chain
    /// as it was before the write.
    pub fn transaction_recorded(
        &mut self,
        previous: Option<&Transaction>,
        recorded: &Transaction,
        chain_before: &[Transaction],
    ) {
        use EventType::*;
        let subscription = recorded.purchase_type == PurchaseType::Subscription;
        let trial = is_trial(recorded);
        let t = Some(recorded);
        match previous {
            None if !subscription => self.push(NonSubscriptionPurchase, t, None),
            None => {
                let earlier = chain_before
                    .iter()
                    .filter(|x| x.store_transaction_id != recorded.store_transaction_id)
                    .filter(|x| x.purchased_at <= recorded.purchased_at)
                    .max_by_key(|x| x.purchased_at);
                let kind = match earlier {
                    _ if trial => TrialStarted,
                    Some(before) if is_trial(before) => TrialConverted,
                    Some(_) => SubscriptionRenewed,
                    None => SubscriptionStarted,
                };
                self.push(kind, t, None);
            }
            Some(before) if subscription => {
                let was_on = before.renew_status != Some(false);
                let is_on = recorded.renew_status != Some(false);
                if was_on && !is_on {
                    let kind = if trial {
                        TrialRenewalCancelled
                    } else {
                        SubscriptionRenewalCancelled
                    };
                    self.push(kind, t, None);
                } else if !was_on && is_on {
                    let kind = if trial {
                        TrialRenewalReactivated
                    } else {
                        SubscriptionRenewalReactivated
                    };
                    self.push(kind, t, None);
                }
            }
            Some(_) => {}
        }
        let before = previous;
        let newly = |get: fn(&Transaction) -> Option<DateTime<Utc>>| {
            get(recorded).is_some() && before.and_then(get).is_none()
        };
        if subscription && newly(|x| x.billing_issue_detected_at) {
            self.push(BillingIssueDetected, t, None);
        }
        if subscription
            && newly(|x| x.grace_period_expires_at)
            && recorded
                .grace_period_expires_at
                .is_some_and(|g| g > self.now)
        {
            self.push(EnteredGracePeriod, t, None);
        }
        if newly(|x| x.refunded_at) {
            let kind = if subscription {
                SubscriptionRefunded
            } else {
                NonSubscriptionPurchaseRefunded
            };
            self.push(kind, t, None);
        }
    }

    /// `subscription_expired` or `trial_expired` for a chain whose last period has ended.
    pub fn expired(&mut self, last: &Transaction) {
        let kind = if is_trial(last) {
            EventType::TrialExpired
        } else {
            EventType::SubscriptionExpired
        };
        let mut shown = last.clone();
        if shown.cancellation_reason.is_none() {
            shown.cancellation_reason = Some(
                if last.billing_issue_detected_at.is_some() {
                    "billing_error"
                } else if last.renew_status == Some(false) {
                    "voluntarily_cancelled"
                } else {
                    "unknown"
                }
                .to_string(),
            );
        }
        self.push(kind, Some(&shown), None);
    }

    /// `access_level_updated` for `level` as it is now, once its access has run out.
    pub fn access_ended(&mut self, level: &str) {
        let views = access::derive(self.app, self.state, self.now);
        if let Some(view) = views
            .iter()
            .find(|v| v.access_level_id == level && !v.is_active)
        {
            self.push(EventType::AccessLevelUpdated, None, Some(view));
        }
    }

    /// `access_level_updated` for every level whose state differs from `before` (the profile
    /// as it was, seen at the same instant), or `at_least` when given even if unchanged.
    pub fn access_changes(&mut self, before: Option<&ProfileState>, at_least: Option<&str>) {
        let after = access::derive(self.app, self.state, self.now);
        let before = before
            .map(|b| access::derive(self.app, b, self.now))
            .unwrap_or_default();
        for level in &after {
            let old = before
                .iter()
                .find(|b| b.access_level_id == level.access_level_id);
            let changed = old.is_none_or(|old| Fingerprint::of(old) != Fingerprint::of(level));
            if changed || at_least == Some(level.access_level_id.as_str()) {
                self.push(EventType::AccessLevelUpdated, None, Some(level));
            }
        }
    }
}

/// What a receiver sees of a level; a change in any of it is an `access_level_updated`.
#[derive(PartialEq)]
struct Fingerprint {
    is_active: bool,
    expires_at: Option<DateTime<Utc>>,
    will_renew: bool,
    is_in_grace_period: bool,
    is_refund: bool,
    billing_issue_detected_at: Option<DateTime<Utc>>,
    renewal_cancelled_at: Option<DateTime<Utc>>,
    source: Option<String>,
    starts_at: DateTime<Utc>,
}

impl Fingerprint {
    fn of(v: &AccessLevelView<'_>) -> Self {
        Self {
            is_active: v.is_active,
            expires_at: v.expires_at,
            will_renew: v.will_renew,
            is_in_grace_period: v.is_in_grace_period,
            is_refund: v.is_refund,
            billing_issue_detected_at: v.billing_issue_detected_at,
            renewal_cancelled_at: v.renewal_cancelled_at,
            source: v.transaction().map(|t| t.store_transaction_id.clone()),
            starts_at: v.starts_at,
        }
    }
}

#[cfg(test)]
mod tests;
