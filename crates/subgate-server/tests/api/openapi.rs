//! Response bodies checked against the schemas in Adapty's OpenAPI file (the 3.0 copy in
//! ../shared/spec, with `nullable` turned into JSON Schema).

use crate::common::*;
use chrono::Duration;
use reqwest::Method;
use serde_json::{json, Value};
use std::path::PathBuf;

fn spec_path() -> PathBuf {
    if let Ok(p) = std::env::var("SUBGATE_OPENAPI_SPEC") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/spec/adapty-api.openapi.3.0.yaml")
}

/// OpenAPI 3.0's `nullable: true` has no JSON Schema meaning: rewrite it as "or null".
fn to_json_schema(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for child in map.values_mut() {
                to_json_schema(child);
            }
            if map.remove("nullable") == Some(Value::Bool(true)) {
                if let Some(Value::Array(values)) = map.get_mut("enum") {
                    values.push(Value::Null);
                }
                match map.get("type").cloned() {
                    Some(Value::String(t)) => {
                        map.insert("type".into(), json!([t, "null"]));
                    }
                    _ => {
                        let inner = Value::Object(std::mem::take(map));
                        map.insert("anyOf".into(), json!([inner, {"type": "null"}]));
                    }
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(to_json_schema),
        _ => {}
    }
}

struct Schemas {
    components: Value,
}

impl Schemas {
    fn load() -> Self {
        let path = spec_path();
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let mut doc: Value = serde_yaml::from_str(&text).unwrap();
        to_json_schema(&mut doc);
        Self {
            components: doc["components"].clone(),
        }
    }

    fn check(&self, name: &str, instance: &Value) {
        let schema =
            json!({"$ref": format!("#/components/schemas/{name}"), "components": self.components});
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .unwrap();
        let errors: Vec<String> = validator
            .iter_errors(instance)
            .map(|e| format!("{} at {}", e, e.instance_path))
            .collect();
        assert!(
            errors.is_empty(),
            "{name} does not match the spec: {errors:#?}\n{instance:#}"
        );
    }
}

async fn every_route_answers_with_the_documented_schemas(backend: Backend) {
    let schemas = Schemas::load();
    let s = TestServer::start(backend).await;
    let now = s.now();
    let (_, created) = s.profile(Method::POST, "u", Some(json!({"custom_attributes": [{"key": "n", "value": 1}, {"key": "s", "value": "x"}]}))).await;
    schemas.check("ProfileResponse", &created);
    let with_offer = with(
        subscription("t1", "t1", now),
        json!({"offer": {"category": "introductory", "type": "pay_up_front"}, "billing_issue_detected_at": iso(now + Duration::days(29)), "grace_period_expires_at": iso(now + Duration::days(33))}),
    );
    let (_, sub) = s.post(SET_TRANSACTION, "u", with_offer).await;
    schemas.check("ProfileResponse", &sub);
    let (_, one) = s
        .post(
            SET_TRANSACTION,
            "u",
            one_time("o1", "com.test.lifetime", 5.0, now),
        )
        .await;
    schemas.check("ProfileResponse", &one);
    let (_, granted) = s
        .post(
            GRANT,
            "u",
            json!({"access_level_id": "pro", "expires_at": iso(now + Duration::days(3))}),
        )
        .await;
    schemas.check("ProfileResponse", &granted);
    let (_, revoked) = s.post(REVOKE, "u", json!({"access_level_id": "pro"})).await;
    schemas.check("ProfileResponse", &revoked);
    let (_, patched) = s
        .profile(Method::PATCH, "u", Some(json!({"first_name": "A"})))
        .await;
    schemas.check("ProfileResponse", &patched);
    let (_, got) = s.profile(Method::GET, "u", None).await;
    schemas.check("ProfileResponse", &got);
    assert_eq!(got["data"]["access_levels"].as_array().unwrap().len(), 2);
    assert_eq!(got["data"]["subscriptions"].as_array().unwrap().len(), 1);
    assert_eq!(
        got["data"]["non_subscriptions"].as_array().unwrap().len(),
        1
    );

    let (_, missing) = s.profile(Method::GET, "nobody", None).await;
    schemas.check("ErrorResponse", &missing);
    let (_, invalid) = s
        .post(
            SET_TRANSACTION,
            "u",
            json!({"purchase_type": "subscription"}),
        )
        .await;
    schemas.check("ErrorResponse", &invalid);
    let (_, unauthenticated) = s.send(Method::GET, PROFILE, None, &[], None).await;
    schemas.check("ErrorResponse", &unauthenticated);
}

on_every_backend!(every_route_answers_with_the_documented_schemas,);
