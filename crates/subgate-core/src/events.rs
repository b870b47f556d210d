//! Adapty's webhook events: which change fires which event, and the payload Adapty sends.
//!
//! Events are computed inside a write's `decide`, from the state before and after it, and are
//! stored in the same database commit as the change (an outbox); a worker delivers them. This
//! module is pure: the caller passes the instant and the state.

use crate::access::{self, AccessLevelView};
use crate::model::{App, AttributeValue, Environment, ProfileState, PurchaseType, Transaction};
use crate::time::format_v1;
use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};
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
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// Also `event_properties.profile_event_id`, the receivers' deduplication key.
    pub id: Uuid,
    pub event_type: EventType,
    pub profile_id: Uuid,
    pub environment: Environment,
    pub occurred_at: DateTime<Utc>,
    /// The body Adapty would send, with the event's own name in `event_type`.
    pub payload: Value,
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

fn attribute_map(state: &ProfileState) -> Map<String, Value> {
    state
        .profile
        .doc
        .attributes
        .iter()
        .map(|(k, v)| {
            let value = match v {
                AttributeValue::Number(n) => json!(n),
                AttributeValue::Text(s) => json!(s),
            };
            (k.clone(), value)
        })
        .collect()
}

fn meta(state: &ProfileState, key: &str) -> Value {
    state
        .profile
        .doc
        .installation_meta
        .as_ref()
        .and_then(|m| m.get(key))
        .cloned()
        .unwrap_or(Value::Null)
}

fn date(t: Option<DateTime<Utc>>) -> Value {
    t.map_or(Value::Null, |t| Value::String(format_v1(&t)))
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

fn transaction_properties(props: &mut Map<String, Value>, state: &ProfileState, t: &Transaction) {
    let offer = t.offer.as_ref();
    let fields = [
        ("store", json!(t.store)),
        ("store_country", json!(t.price.country)),
        ("environment", json!(t.environment.as_str())),
        ("vendor_product_id", json!(t.store_product_id)),
        ("base_plan_id", json!(t.store_base_plan_id)),
        ("transaction_id", json!(t.store_transaction_id)),
        (
            "original_transaction_id",
            json!(t.store_original_transaction_id),
        ),
        ("purchase_date", date(Some(t.purchased_at))),
        (
            "original_purchase_date",
            date(t.originally_purchased_at.or(Some(t.purchased_at))),
        ),
        ("subscription_expires_at", date(t.expires_at)),
        ("price_local", json!(money(t.price.value_micros))),
        ("price_usd", json!(money(t.price.usd_micros))),
        ("currency", json!(t.price.currency)),
        ("cancellation_reason", json!(t.cancellation_reason)),
        (
            "consecutive_payments",
            json!(consecutive_payments(state, t)),
        ),
        ("store_offer_category", json!(offer.map(|o| &o.category))),
        (
            "promotional_offer_id",
            json!(offer
                .filter(|o| o.category == "promotional")
                .and_then(|o| o.id.as_ref())),
        ),
        ("variation_id", json!(t.variation_id)),
    ];
    for (k, v) in fields {
        props.insert(k.to_string(), v);
    }
}

fn level_properties(props: &mut Map<String, Value>, v: &AccessLevelView<'_>) {
    let offer = v.transaction().and_then(|t| t.offer.as_ref());
    let offer_of = |category: &str| offer.filter(|o| o.category == category);
    let renewed_at = v
        .transaction()
        .filter(|t| t.store_transaction_id != t.store_original_transaction_id)
        .map(|t| t.purchased_at);
    let fields = [
        ("access_level_id", json!(v.access_level_id)),
        ("is_active", json!(v.is_active)),
        ("is_lifetime", json!(v.is_lifetime())),
        ("expires_at", date(v.expires_at)),
        ("will_renew", json!(v.will_renew)),
        ("is_in_grace_period", json!(v.is_in_grace_period)),
        ("is_refund", json!(v.is_refund)),
        ("activated_at", date(Some(v.activated_at))),
        ("renewed_at", date(renewed_at)),
        (
            "billing_issue_detected_at",
            date(v.billing_issue_detected_at),
        ),
        ("cancellation_reason", json!(v.cancellation_reason)),
        (
            "active_introductory_offer_type",
            json!(offer_of("introductory").map(|o| &o.offer_type)),
        ),
        (
            "active_promotional_offer_type",
            json!(offer_of("promotional").map(|o| &o.offer_type)),
        ),
        (
            "active_promotional_offer_id",
            json!(offer_of("promotional").and_then(|o| o.id.as_ref())),
        ),
    ];
    for (k, v) in fields {
        props.insert(k.to_string(), v);
    }
}

/// Builds events for one profile at one instant.
pub struct EventBuilder<'a> {
    app: &'a App,
    state: &'a ProfileState,
    now: DateTime<Utc>,
    events: Vec<NewEvent>,
    /// `profile_has_access_level`, the same for every event of the builder: derived once.
    has_access: std::cell::OnceCell<bool>,
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
        }
    }

    pub fn finish(self) -> Vec<NewEvent> {
        self.events
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
        let environment = transaction
            .or_else(|| level.and_then(|l| l.transaction()))
            .map_or(Environment::Production, |t| t.environment);
        let now = self.now;
        let has_access = *self.has_access.get_or_init(|| {
            access::derive(self.app, state, now)
                .iter()
                .any(|l| l.is_active)
        });
        let mut props = Map::new();
        props.insert("profile_event_id".into(), json!(id));
        props.insert("profile_id".into(), json!(profile.id));
        props.insert("event_datetime".into(), date(Some(now)));
        if let Some(t) = transaction.or_else(|| level.and_then(|l| l.transaction())) {
            transaction_properties(&mut props, state, t);
        } else {
            props.insert("environment".into(), json!(environment.as_str()));
        }
        if let Some(level) = level {
            level_properties(&mut props, level);
        }
        props.insert(
            "profile_total_revenue_usd".into(),
            json!(money(state.total_revenue_usd_micros())),
        );
        props.insert("profile_has_access_level".into(), json!(has_access));
        props.insert(
            "profile_country".into(),
            json!(profile.doc.fields.ip_country),
        );
        props.insert(
            "profile_ip_address".into(),
            json!(profile.doc.fields.ip_v4_address),
        );
        let payload = json!({
            "profile_id": profile.id,
            "customer_user_id": profile.customer_user_id,
            "idfv": meta(state, "idfv"),
            "idfa": meta(state, "idfa"),
            "advertising_id": meta(state, "advertising_id"),
            "profile_install_datetime": date(Some(profile.created_at)),
            "user_agent": meta(state, "user_agent"),
            "email": profile.doc.fields.email,
            "event_type": event_type.as_str(),
            "event_datetime": date(Some(now)),
            "event_api_version": 1,
            "event_properties": props,
            "profiles_sharing_access_level": [],
            "user_attributes": attribute_map(state),
            "attributions": {},
            "integration_ids": {},
        });
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
