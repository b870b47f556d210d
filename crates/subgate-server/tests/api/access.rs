use crate::common::*;
use chrono::Duration;
use serde_json::json;

/// A server whose user `u` was just granted premium for seven days: the server, the grant's
/// instant and its answer.
async fn granted_for_seven_days(
    backend: Backend,
) -> (TestServer, chrono::DateTime<chrono::Utc>, serde_json::Value) {
    let s = TestServer::start(backend).await;
    s.create("u").await;
    let now = s.now();
    let (status, p) = s
        .post(
            GRANT,
            "u",
            json!({"access_level_id": "premium", "expires_at": iso(now + Duration::days(7))}),
        )
        .await;
    assert_eq!(status, 200, "{p}");
    (s, now, p)
}

async fn grant_for_seven_days_then_it_lapses(backend: Backend) {
    let (s, now, p) = granted_for_seven_days(backend).await;
    let premium = level(&p["data"], "premium").unwrap();
    assert_eq!(premium["expires_at"], iso(now + Duration::days(7)));
    assert_eq!(premium["starts_at"], iso(now));
    assert!(is_active(&p["data"], "premium", now));
    s.advance(Duration::days(7));
    assert!(!is_active(&s.get("u").await, "premium", s.now()));
}

async fn grant_defaults_alias_and_future_starts(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create("u").await;
    let now = s.now();
    let (status, p) = s
        .post(GRANT_ALIAS, "u", json!({"access_level_id": "pro"}))
        .await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(
        level(&p["data"], "pro").unwrap()["expires_at"],
        json!(null),
        "no dates: lifetime from now"
    );

    let start = now + Duration::days(3);
    let (_, p) = s
        .post(
            GRANT,
            "u",
            json!({"access_level_id": "premium", "starts_at": iso(start)}),
        )
        .await;
    assert!(
        !is_active(&p["data"], "premium", now),
        "not before starts_at"
    );
    s.advance(Duration::days(4));
    assert!(is_active(&s.get("u").await, "premium", s.now()));

    let (status, p) = s.post(GRANT, "u", json!({"access_level_id": "premium", "expires_at": iso(now - Duration::days(1)), "starts_at": iso(now - Duration::days(2))})).await;
    assert_eq!(status, 200, "a grant in the past is allowed: {p}");
}

async fn grant_extends_and_never_shortens(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create("u").await;
    let now = s.now();
    s.transaction("u", subscription("t1", "t1", now)).await;
    let (_, p) = s
        .post(
            GRANT,
            "u",
            json!({"access_level_id": "premium", "expires_at": iso(now + Duration::days(7))}),
        )
        .await;
    assert_eq!(
        level(&p["data"], "premium").unwrap()["expires_at"],
        iso(now + Duration::days(30))
    );
    let (_, p) = s
        .post(
            GRANT,
            "u",
            json!({"access_level_id": "premium", "expires_at": iso(now + Duration::days(45))}),
        )
        .await;
    assert_eq!(
        level(&p["data"], "premium").unwrap()["expires_at"],
        iso(now + Duration::days(45))
    );
}

async fn revoke_now_later_and_its_limits(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create("u").await;
    let now = s.now();
    s.transaction("u", subscription("t1", "t1", now)).await;
    s.post(
        GRANT,
        "u",
        json!({"access_level_id": "premium", "expires_at": iso(now + Duration::days(40))}),
    )
    .await;

    // Later than the current expiry: refused, nothing changes.
    let (status, resp) = s
        .post(
            REVOKE,
            "u",
            json!({"access_level_id": "premium", "revoke_at": iso(now + Duration::days(41))}),
        )
        .await;
    assert_error(
        status,
        &resp,
        400,
        "revocation_date_more_than_expiration_date",
        "revoke_at",
    );
    assert!(resp["errors"][0]["errors"][0]
        .as_str()
        .unwrap()
        .starts_with("Revocation date ("));

    // A future revoke caps every source at that date.
    let cut = now + Duration::days(5);
    let (status, p) = s
        .post(
            REVOKE,
            "u",
            json!({"access_level_id": "premium", "revoke_at": iso(cut)}),
        )
        .await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(
        level(&p["data"], "premium").unwrap()["expires_at"],
        iso(cut)
    );
    assert!(is_active(&p["data"], "premium", now));
    s.advance(Duration::days(6));
    assert!(!is_active(&s.get("u").await, "premium", s.now()));

    // A grant after a revoke gives access again; revoking with no date ends it now.
    let (_, p) = s
        .post(GRANT, "u", json!({"access_level_id": "premium"}))
        .await;
    assert!(is_active(&p["data"], "premium", s.now()));
    let (status, p) = s
        .post(
            REVOKE,
            "u",
            json!({"access_level_id": "premium", "revoke_at": null}),
        )
        .await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(
        level(&p["data"], "premium").unwrap()["expires_at"],
        iso(s.now())
    );
    assert!(!is_active(&p["data"], "premium", s.now()));
    assert_eq!(
        p["data"]["total_revenue_usd"], 9.99,
        "revoking leaves revenue alone"
    );
}

/// The answer a grant's write stored holds until the grant ends; the first read after that
/// renders the profile, and stores the new answer for the reads after it.
async fn a_read_past_the_stored_answer_renews_it(backend: Backend) {
    let (s, now, p) = granted_for_seven_days(backend).await;
    let app_id: uuid::Uuid = p["data"]["app_id"].as_str().unwrap().parse().unwrap();
    let store = subgate_server::open_store_for_reading(&subgate_server::config::DatabaseSettings {
        url: s.db.url.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let key = subgate_core::model::ProfileKey::CustomerUserId("u".into());
    let stored = || async { store.load_rendered(app_id, &key).await.unwrap() };
    let written = stored().await.expect("the grant stored an answer");
    // The grant answered with that answer, as a read at the same instant does.
    assert_eq!(s.get("u").await, p["data"]);
    assert!(is_active(&s.get("u").await, "premium", s.now()));
    assert_eq!(
        stored().await.as_ref(),
        Some(&written),
        "a read within it keeps it"
    );

    s.advance(Duration::days(8));
    assert!(!is_active(&s.get("u").await, "premium", s.now()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while stored().await.as_ref() == Some(&written) {
        assert!(
            std::time::Instant::now() < deadline,
            "no renewed answer after the window"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let again = s.get("u").await;
    assert!(!is_active(&again, "premium", s.now()));
    assert_eq!(
        level(&again, "premium").unwrap()["expires_at"],
        iso(now + Duration::days(7))
    );
}

on_every_backend!(
    a_read_past_the_stored_answer_renews_it,
    grant_for_seven_days_then_it_lapses,
    grant_defaults_alias_and_future_starts,
    grant_extends_and_never_shortens,
    revoke_now_later_and_its_limits,
);
