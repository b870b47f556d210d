use crate::common::*;
use reqwest::Method;
use serde_json::json;

async fn create_round_trips_every_field_and_a_retry_is_an_update(backend: Backend) {
    let s = TestServer::start(backend).await;
    let body = json!({
        "first_name": "Jane", "last_name": "Doe", "gender": "f", "email": "jane@example.com",
        "phone_number": "+1234567890", "birthday": "2000-12-31", "ip_country": "FR",
        "store_country": "US", "store": "app_store", "analytics_disabled": true,
        "custom_attributes": [{"key": "favourite_sport", "value": "yoga"}],
        "installation_meta": {"device_id": "3fa85f64-5717-4562-b3fc-2c963f66afa6", "locale": "en", "platform": "iOS"}
    });
    let (status, created) = s
        .send(
            Method::POST,
            PROFILE,
            Some(SECRET),
            &[
                ("adapty-customer-user-id", "jane"),
                ("adapty-platform", "iOS"),
            ],
            Some(body.clone()),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    let p = &created["data"];
    for field in [
        "first_name",
        "last_name",
        "gender",
        "email",
        "phone_number",
        "birthday",
        "ip_country",
        "store_country",
        "store",
        "analytics_disabled",
    ] {
        assert_eq!(p[field], body[field], "{field}");
    }
    assert_eq!(p["installation_meta"]["locale"], "en");
    assert_eq!(
        p["custom_attributes"],
        json!([{"key": "favourite_sport", "value": "yoga"}])
    );
    assert_eq!(p["customer_user_id"], "jane");
    assert_eq!(p["app_id"], "5d3c1c1e-9a57-4d8e-b5e2-0c9a4a1f2b10");
    assert_eq!(p["total_revenue_usd"], 0.0);
    assert_eq!(p["timestamp"], s.now().timestamp_millis());
    for list in ["access_levels", "subscriptions", "non_subscriptions"] {
        assert_eq!(p[list], json!([]), "{list}");
    }

    // The same profile by its id, and a retried create answers 200 with the same profile.
    let id = p["profile_id"].as_str().unwrap().to_string();
    let (status, by_id) = s
        .send(
            Method::GET,
            PROFILE,
            Some(PUBLIC),
            &[("adapty-profile-id", &id)],
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(by_id["data"]["email"], "jane@example.com");
    let again = s.create("jane").await;
    assert_eq!(again["profile_id"], id.as_str());

    // PATCH changes what it names; null clears a nullable field.
    let (status, patched) = s
        .profile(
            Method::PATCH,
            "jane",
            Some(json!({"first_name": "Janet", "email": null})),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    let got = s.get("jane").await;
    assert_eq!(got["first_name"], "Janet");
    assert_eq!(got["email"], json!(null));
    assert_eq!(got["last_name"], "Doe");
}

async fn anonymous_profiles_and_attaching_a_customer_user_id(backend: Backend) {
    let s = TestServer::start(backend).await;
    let anon = "0b8d2a4c-1111-4c4c-9d9d-123456789abc";
    let (status, p) = s
        .send(
            Method::POST,
            PROFILE,
            Some(SECRET),
            &[("adapty-profile-id", anon)],
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["data"]["profile_id"], anon);
    assert_eq!(p["data"]["customer_user_id"], json!(null));
    let (status, p) = s
        .send(
            Method::POST,
            PROFILE,
            Some(SECRET),
            &[
                ("adapty-profile-id", anon),
                ("adapty-customer-user-id", "later"),
            ],
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(s.get("later").await["profile_id"], anon);

    // A customer user id already taken by another profile is refused.
    s.create("taken").await;
    let (status, body) = s
        .send(
            Method::POST,
            PROFILE,
            Some(SECRET),
            &[
                ("adapty-profile-id", anon),
                ("adapty-customer-user-id", "taken"),
            ],
            Some(json!({})),
        )
        .await;
    assert_error(status, &body, 400, "validation_error", "customer_user_id");
}

async fn delete_answers_204_and_the_profile_is_gone(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create("gone").await;
    let (status, body) = s.profile(Method::DELETE, "gone", None).await;
    assert_eq!(status, 204);
    assert_eq!(body, serde_json::Value::Null);
    let (status, body) = s.profile(Method::GET, "gone", None).await;
    assert_error(status, &body, 404, "not_found", "non_field_errors");
    let (status, body) = s.profile(Method::DELETE, "gone", None).await;
    assert_error(status, &body, 404, "not_found", "non_field_errors");
    let (status, body) = s
        .profile(Method::PATCH, "gone", Some(json!({"first_name": "x"})))
        .await;
    assert_error(status, &body, 404, "not_found", "non_field_errors");
}

async fn authentication_and_app_isolation(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create("u").await;
    let who = [("adapty-customer-user-id", "u")];
    let (status, body) = s.send(Method::GET, PROFILE, None, &who, None).await;
    assert_error(status, &body, 401, "not_authenticated", "non_field_errors");
    let (status, body) = s.send(Method::GET, PROFILE, Some("nope"), &who, None).await;
    assert_error(status, &body, 401, "not_authenticated", "non_field_errors");
    let (status, _) = s.send(Method::GET, PROFILE, Some(PUBLIC), &who, None).await;
    assert_eq!(status, 200);
    // Purchases need the secret key.
    for path in [SET_TRANSACTION, GRANT, REVOKE] {
        let (status, body) = s
            .send(
                Method::POST,
                path,
                Some(PUBLIC),
                &who,
                Some(json!({"access_level_id": "premium"})),
            )
            .await;
        assert_error(status, &body, 401, "not_authenticated", "non_field_errors");
    }
    // Another app's key sees nothing of this app.
    let (status, body) = s
        .send(Method::GET, PROFILE, Some(OTHER_SECRET), &who, None)
        .await;
    assert_error(status, &body, 404, "not_found", "non_field_errors");
    // The same customer user id in the other app is another profile, and each app finds its
    // own (PostgreSQL looks customer user ids up in an index that does not hold the app).
    let attribute = json!({"custom_attributes": [{"key": "app", "value": "other"}]});
    let (status, other) = s
        .send(
            Method::POST,
            PROFILE,
            Some(OTHER_SECRET),
            &who,
            Some(attribute),
        )
        .await;
    assert_eq!(status, 200, "{other}");
    let (status, mine) = s.send(Method::GET, PROFILE, Some(SECRET), &who, None).await;
    assert_eq!(status, 200, "{mine}");
    let (status, theirs) = s
        .send(Method::GET, PROFILE, Some(OTHER_SECRET), &who, None)
        .await;
    assert_eq!(status, 200, "{theirs}");
    assert_ne!(mine["data"]["profile_id"], theirs["data"]["profile_id"]);
    assert_eq!(theirs["data"]["profile_id"], other["data"]["profile_id"]);
    assert_eq!(mine["data"]["custom_attributes"], json!([]));
    assert_eq!(
        theirs["data"]["custom_attributes"],
        json!([{"key": "app", "value": "other"}])
    );
}

async fn custom_attributes_follow_the_documented_rules(backend: Backend) {
    let s = TestServer::start(backend).await;
    let first = s.create("a").await;
    let (status, p) = s
        .profile(
            Method::PATCH,
            "a",
            Some(json!({"custom_attributes": {"words": 12, "paid": true, "tier": "gold"}})),
        )
        .await;
    assert_eq!(status, 200, "{p}");
    let attrs = &p["data"]["custom_attributes"];
    assert!(attrs
        .as_array()
        .unwrap()
        .contains(&json!({"key": "paid", "value": 1.0})));
    assert!(attrs
        .as_array()
        .unwrap()
        .contains(&json!({"key": "words", "value": 12.0})));
    assert_ne!(p["data"]["segment_hash"], first["segment_hash"]);

    // null and "" delete.
    let (_, p) = s.profile(Method::PATCH, "a", Some(json!({"custom_attributes": [{"key": "words", "value": null}, {"key": "tier", "value": ""}]}))).await;
    assert_eq!(
        p["data"]["custom_attributes"],
        json!([{"key": "paid", "value": 1.0}])
    );

    // Over 30 attributes: refused whole, nothing changes.
    let many: serde_json::Map<_, _> = (0..30).map(|i| (format!("k{i}"), json!(i))).collect();
    let (status, body) = s
        .profile(Method::PATCH, "a", Some(json!({"custom_attributes": many})))
        .await;
    assert_error(status, &body, 400, "validation_error", "custom_attributes");
    assert_eq!(
        s.get("a").await["custom_attributes"],
        json!([{"key": "paid", "value": 1.0}])
    );

    for bad in [
        json!({"bad key!": 1}),
        json!({"k": "x".repeat(31)}),
        json!({"k".repeat(31): 1}),
        json!({"k": {"nested": 1}}),
        json!([]),
    ] {
        let (status, body) = s
            .profile(Method::PATCH, "a", Some(json!({"custom_attributes": bad})))
            .await;
        assert_error(status, &body, 400, "validation_error", "custom_attributes");
    }
}

on_every_backend!(
    create_round_trips_every_field_and_a_retry_is_an_update,
    anonymous_profiles_and_attaching_a_customer_user_id,
    delete_answers_204_and_the_profile_is_gone,
    authentication_and_app_isolation,
    custom_attributes_follow_the_documented_rules,
);
