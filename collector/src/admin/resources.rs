//! Each endpoint: check the input (`input`), write PostgreSQL, then
//! propagate to Redis. Responses are built as JSON by PostgreSQL itself
//! (`json_build_object`), decimals as strings (`trim_scale(x)::text`),
//! times in UTC (the pool's `TimeZone`).
//!
//! Collections are paged by id: `?limit=` (1..=1000, default 100) and
//! `?after=` (the last id of the previous page), answered as
//! `{"items": [...], "next_after": id|null}`.

use affgate_schema::link::{MAX_URL_LEN, check_destination, valid_slug, valid_url};
use hyper::{Method, StatusCode};
use serde_json::Value;

use super::input::{Body, MAX_NAME, Query, currency};
use super::{Admin, ApiError, slug};
use crate::conversions::split::{MAX_LEVELS, check_levels};

type Reply = Result<(StatusCode, String), ApiError>;

const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1000;
/// Attempts at a free generated slug before giving up.
const SLUG_ATTEMPTS: usize = 8;

const NETWORK_JSON: &str =
    "json_build_object('id', t.id, 'name', t.name, 'created_at', t.created_at)";
const OFFER_JSON: &str = "json_build_object('id', t.id, 'name', t.name, 'network_id', t.network_id,
    'payout', trim_scale(t.payout)::text, 'currency', t.currency,
    'commission_levels', (SELECT json_agg(trim_scale(x)::text) FROM unnest(t.commission_levels) x),
    'daily_cap', t.daily_cap, 'attribution_window_days', t.attribution_window_days,
    'fallback_url', t.fallback_url, 'status', t.status,
    'capped', coalesce(t.capped_on >= (now() AT TIME ZONE 'UTC')::date, false),
    'created_at', t.created_at)";
const AFFILIATE_JSON: &str =
    "json_build_object('id', t.id, 'name', t.name, 'parent_id', t.parent_id,
    'path', t.path::text, 'postback_url', t.postback_url, 'created_at', t.created_at)";
const LINK_JSON: &str = "json_build_object('id', t.id, 'slug', t.slug, 'offer_id', t.offer_id,
    'affiliate_id', t.affiliate_id, 'destination', t.destination,
    'redirect_code', t.redirect_code, 'status', t.status, 'version', t.version,
    'created_at', t.created_at, 'updated_at', t.updated_at)";
const CONVERSION_JSON: &str = "json_build_object('id', t.id, 'click_id', t.click_id,
    'network_id', t.network_id, 'txid', t.txid, 'event', t.event, 'link_id', t.link_id,
    'offer_id', t.offer_id, 'affiliate_id', t.affiliate_id, 'status', t.status,
    'payout', trim_scale(t.payout)::text, 'currency', t.currency, 'click_ts', t.click_ts,
    'converted_at', t.converted_at, 'created_at', t.created_at, 'updated_at', t.updated_at,
    'commissions', (SELECT coalesce(json_agg(json_build_object('level', m.level,
        'affiliate_id', m.affiliate_id, 'rate', trim_scale(m.rate)::text,
        'amount', trim_scale(m.amount)::text, 'currency', m.currency, 'status', m.status)
        ORDER BY m.level), '[]'::json) FROM commissions m WHERE m.conversion_id = t.id))";

/// Dispatch on method and path segments after `/api/v1/`.
pub async fn route(
    admin: &Admin,
    method: &Method,
    segments: &[&str],
    query: Option<&str>,
    body: Option<Value>,
) -> Reply {
    let body_of = |allowed: &[&str]| -> Result<Body, ApiError> {
        match &body {
            Some(v) => Body::new(v.clone(), allowed),
            None => Err(ApiError::bad_request("a JSON object body is required")),
        }
    };
    let no_body = || -> Result<(), ApiError> {
        match body {
            Some(_) => Err(ApiError::bad_request("this request takes no body")),
            None => Ok(()),
        }
    };
    match (method, segments) {
        (&Method::POST, ["networks"]) => create_network(admin, body_of(NETWORK_FIELDS)?).await,
        (&Method::POST, ["offers"]) => create_offer(admin, body_of(OFFER_FIELDS)?).await,
        (&Method::POST, ["affiliates"]) => {
            create_affiliate(admin, body_of(AFFILIATE_FIELDS)?).await
        }
        (&Method::POST, ["links"]) => create_link(admin, body_of(LINK_FIELDS)?).await,
        (&Method::PATCH, ["links", id]) => {
            patch_link(admin, path_id(id)?, body_of(LINK_PATCH_FIELDS)?).await
        }
        (&Method::PATCH, ["offers", id]) => {
            patch_offer(admin, path_id(id)?, body_of(OFFER_PATCH_FIELDS)?).await
        }
        (&Method::GET, [collection]) => {
            no_body()?;
            let (table, obj) = resource(collection)?;
            if *collection == "conversions" {
                list_conversions(admin, query).await
            } else {
                let q = Query::parse(query, &["limit", "after"])?;
                list(admin, table, obj, "", &q, Vec::new()).await
            }
        }
        (&Method::GET, [collection, id]) => {
            no_body()?;
            let (table, obj) = resource(collection)?;
            let id = path_id(id)?;
            get(admin, table, obj, id, singular(collection)).await
        }
        (_, [c] | [c, _]) if resource(c).is_ok() => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{method} is not allowed here"),
            None,
        )),
        _ => Err(ApiError::not_found("endpoint")),
    }
}

fn resource(collection: &str) -> Result<(&'static str, &'static str), ApiError> {
    Ok(match collection {
        "networks" => ("networks", NETWORK_JSON),
        "offers" => ("offers", OFFER_JSON),
        "affiliates" => ("affiliates", AFFILIATE_JSON),
        "links" => ("links", LINK_JSON),
        "conversions" => ("conversions", CONVERSION_JSON),
        _ => return Err(ApiError::not_found("endpoint")),
    })
}

fn singular(collection: &str) -> &'static str {
    match collection {
        "networks" => "network",
        "offers" => "offer",
        "affiliates" => "affiliate",
        "links" => "link",
        _ => "conversion",
    }
}

fn path_id(s: &str) -> Result<i64, ApiError> {
    s.parse::<i64>()
        .ok()
        .filter(|i| *i > 0)
        .ok_or_else(|| ApiError::not_found("resource"))
}

async fn get(admin: &Admin, table: &str, obj: &str, id: i64, what: &str) -> Reply {
    let row: Option<String> = sqlx::query_scalar(&format!(
        "SELECT {obj}::text FROM {table} t WHERE t.id = $1"
    ))
    .bind(id)
    .fetch_optional(&admin.pool)
    .await?;
    row.map(|j| (StatusCode::OK, j))
        .ok_or_else(|| ApiError::not_found(what))
}

/// A page of `table`, filtered by `filter` (SQL over `t` with parameters
/// `$3`...) bound from `binds`.
async fn list(
    admin: &Admin,
    table: &str,
    obj: &str,
    filter: &str,
    q: &Query,
    binds: Vec<Bind>,
) -> Reply {
    let limit = q.int("limit", 1, MAX_LIMIT)?.unwrap_or(DEFAULT_LIMIT);
    let after = q.int("after", 0, i64::MAX)?.unwrap_or(0);
    let sql = format!(
        "WITH page AS (SELECT t.id, {obj} AS j FROM {table} t
                       WHERE t.id > $1 {filter} ORDER BY t.id LIMIT $2)
         SELECT json_build_object(
            'items', coalesce(json_agg(j ORDER BY id), '[]'::json),
            'next_after', CASE WHEN count(*) = $2 THEN max(id) END)::text
         FROM page"
    );
    let mut query = sqlx::query_scalar::<_, String>(&sql)
        .bind(after)
        .bind(limit);
    for b in binds {
        query = match b {
            Bind::Int(i) => query.bind(i),
            Bind::Text(s) => query.bind(s),
        };
    }
    Ok((StatusCode::OK, query.fetch_one(&admin.pool).await?))
}

enum Bind {
    Int(i64),
    Text(String),
}

async fn list_conversions(admin: &Admin, query: Option<&str>) -> Reply {
    let q = Query::parse(
        query,
        &[
            "limit",
            "after",
            "click_id",
            "affiliate_id",
            "offer_id",
            "status",
        ],
    )?;
    let mut filter = String::new();
    let mut binds = Vec::new();
    let mut n = 3;
    if let Some(c) = q.str("click_id", 64)? {
        filter.push_str(&format!(" AND t.click_id = ${n}"));
        binds.push(Bind::Text(c.to_string()));
        n += 1;
    }
    for name in ["affiliate_id", "offer_id"] {
        if let Some(id) = q.int(name, 1, i64::MAX)? {
            filter.push_str(&format!(" AND t.{name} = ${n}"));
            binds.push(Bind::Int(id));
            n += 1;
        }
    }
    if let Some(s) = q.str("status", 16)? {
        if crate::conversions::decide::ConvStatus::parse(s).is_none() {
            return Err(ApiError::invalid("status", "unknown conversion status"));
        }
        filter.push_str(&format!(" AND t.status = ${n}"));
        binds.push(Bind::Text(s.to_string()));
    }
    list(admin, "conversions", CONVERSION_JSON, &filter, &q, binds).await
}

const NETWORK_FIELDS: &[&str] = &["name", "postback_token"];

async fn create_network(admin: &Admin, b: Body) -> Reply {
    let name = b.str_req("name", MAX_NAME)?;
    let token = b.str_req("postback_token", 200)?;
    if token.len() < 8 {
        return Err(ApiError::invalid(
            "postback_token",
            "must be at least 8 characters",
        ));
    }
    if !token.bytes().all(|c| c.is_ascii_graphic()) {
        return Err(ApiError::invalid(
            "postback_token",
            "must be printable ASCII without spaces",
        ));
    }
    let (id, json): (i64, String) = sqlx::query_as(&format!(
        "WITH t AS (INSERT INTO networks (name, postback_token) VALUES ($1, $2) RETURNING *)
         SELECT t.id, ({NETWORK_JSON}::jsonb || jsonb_build_object('postback_token', t.postback_token))::text FROM t"
    ))
    .bind(&name)
    .bind(&token)
    .fetch_one(&admin.pool)
    .await?;
    admin.propagator.network(id).await;
    Ok((StatusCode::CREATED, json))
}

const OFFER_FIELDS: &[&str] = &[
    "name",
    "network_id",
    "payout",
    "currency",
    "commission_levels",
    "daily_cap",
    "attribution_window_days",
    "fallback_url",
];

fn url_opt(b: &Body, name: &str) -> Result<Option<String>, ApiError> {
    let u = b.str_opt(name, MAX_URL_LEN)?;
    if let Some(u) = &u
        && !valid_url(u)
    {
        return Err(ApiError::invalid(name, "must be an absolute http(s) URL"));
    }
    Ok(u)
}

async fn create_offer(admin: &Admin, b: Body) -> Reply {
    let name = b.str_req("name", MAX_NAME)?;
    let network_id = b.id_req("network_id")?;
    let payout = b.decimal_req("payout")?;
    let cur = b.str_req("currency", 3)?;
    currency("currency", &cur)?;
    let levels = b.decimals_req("commission_levels", MAX_LEVELS)?;
    check_levels(&levels).map_err(|e| ApiError::invalid("commission_levels", &e.to_string()))?;
    let daily_cap = b.int_opt("daily_cap", 1, i64::from(i32::MAX))?;
    let window = b.int_opt("attribution_window_days", 1, 3650)?.unwrap_or(30);
    let fallback = url_opt(&b, "fallback_url")?;
    exists(admin, "networks", network_id, "network_id").await?;
    let (id, json): (i64, String) = sqlx::query_as(&format!(
        "WITH t AS (INSERT INTO offers (name, network_id, payout, currency, commission_levels,
                        daily_cap, attribution_window_days, fallback_url)
            VALUES ($1, $2, $3::numeric / 1000000, $4,
                    (SELECT array_agg(x::numeric / 1000000 ORDER BY o) FROM unnest($5::int8[]) WITH ORDINALITY u(x, o)),
                    $6, $7, $8) RETURNING *)
         SELECT t.id, {OFFER_JSON}::text FROM t"
    ))
    .bind(&name)
    .bind(network_id)
    .bind(payout)
    .bind(&cur)
    .bind(&levels)
    .bind(daily_cap.map(|c| c as i32))
    .bind(window as i32)
    .bind(&fallback)
    .fetch_one(&admin.pool)
    .await?;
    admin.propagator.offer(id).await;
    Ok((StatusCode::CREATED, json))
}

const OFFER_PATCH_FIELDS: &[&str] = &["status", "fallback_url"];

async fn patch_offer(admin: &Admin, id: i64, b: Body) -> Reply {
    let status = b.choice_opt("status", &["active", "paused"])?;
    let fallback = url_opt(&b, "fallback_url")?;
    if status.is_none() && fallback.is_none() {
        return Err(ApiError::bad_request(
            "nothing to change: give status or fallback_url",
        ));
    }
    let json: Option<String> = sqlx::query_scalar(&format!(
        "WITH t AS (UPDATE offers SET status = coalesce($2, status),
                        fallback_url = coalesce($3, fallback_url), version = version + 1
                    WHERE id = $1 RETURNING *)
         SELECT {OFFER_JSON}::text FROM t"
    ))
    .bind(id)
    .bind(&status)
    .bind(&fallback)
    .fetch_optional(&admin.pool)
    .await?;
    let json = json.ok_or_else(|| ApiError::not_found("offer"))?;
    admin.propagator.offer(id).await;
    if fallback.is_some() {
        // Link hashes carry their offer's fallback.
        sqlx::query(
            "UPDATE links SET version = version + 1, updated_at = now() WHERE offer_id = $1",
        )
        .bind(id)
        .execute(&admin.pool)
        .await?;
        admin.propagator.offer_links(id).await;
    }
    Ok((StatusCode::OK, json))
}

const AFFILIATE_FIELDS: &[&str] = &["name", "parent_id", "postback_url"];

async fn create_affiliate(admin: &Admin, b: Body) -> Reply {
    let name = b.str_req("name", MAX_NAME)?;
    let parent = b.id_opt("parent_id")?;
    let postback_url = url_opt(&b, "postback_url")?;
    let mut tx = admin.pool.begin().await?;
    let parent_path: Option<String> = match parent {
        None => None,
        Some(p) => Some(
            sqlx::query_scalar("SELECT path::text FROM affiliates WHERE id = $1")
                .bind(p)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| ApiError::invalid("parent_id", "does not exist"))?,
        ),
    };
    let id: i64 = sqlx::query_scalar("SELECT nextval(pg_get_serial_sequence('affiliates', 'id'))")
        .fetch_one(&mut *tx)
        .await?;
    let path = match parent_path {
        Some(p) => format!("{p}.{id}"),
        None => id.to_string(),
    };
    let json: String = sqlx::query_scalar(&format!(
        "WITH t AS (INSERT INTO affiliates (id, name, parent_id, path, postback_url)
                    VALUES ($1, $2, $3, $4::ltree, $5) RETURNING *)
         SELECT {AFFILIATE_JSON}::text FROM t"
    ))
    .bind(id)
    .bind(&name)
    .bind(parent)
    .bind(&path)
    .bind(&postback_url)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, json))
}

const LINK_FIELDS: &[&str] = &[
    "offer_id",
    "affiliate_id",
    "destination",
    "slug",
    "redirect_code",
];

fn destination(b: &Body, required: bool) -> Result<Option<String>, ApiError> {
    let d = if required {
        Some(b.str_req("destination", MAX_URL_LEN)?)
    } else {
        b.str_opt("destination", MAX_URL_LEN)?
    };
    if let Some(d) = &d {
        check_destination(d).map_err(|e| ApiError::invalid("destination", &e.to_string()))?;
    }
    Ok(d)
}

async fn create_link(admin: &Admin, b: Body) -> Reply {
    let offer_id = b.id_req("offer_id")?;
    let affiliate_id = b.id_req("affiliate_id")?;
    let dest = destination(&b, true)?;
    let given_slug = b.str_opt("slug", affgate_schema::link::MAX_SLUG_LEN)?;
    if let Some(s) = &given_slug
        && !valid_slug(s)
    {
        return Err(ApiError::invalid(
            "slug",
            "must be 1 to 128 of A-Z a-z 0-9 - _ .",
        ));
    }
    let code = b.int_opt("redirect_code", 300, 399)?.unwrap_or(302);
    if !matches!(code, 301 | 302 | 307 | 308) {
        return Err(ApiError::invalid(
            "redirect_code",
            "must be 301, 302, 307 or 308",
        ));
    }
    exists(admin, "offers", offer_id, "offer_id").await?;
    exists(admin, "affiliates", affiliate_id, "affiliate_id").await?;
    let mut rng = fastrand::Rng::new();
    let attempts = if given_slug.is_some() {
        1
    } else {
        SLUG_ATTEMPTS
    };
    for _ in 0..attempts {
        let slug = given_slug
            .clone()
            .unwrap_or_else(|| slug::generate(&mut rng));
        let r: Result<(i64, String), sqlx::Error> = sqlx::query_as(&format!(
            "WITH t AS (INSERT INTO links (slug, offer_id, affiliate_id, destination, redirect_code)
                        VALUES ($1, $2, $3, $4, $5) RETURNING *)
             SELECT t.id, {LINK_JSON}::text FROM t"
        ))
        .bind(&slug)
        .bind(offer_id)
        .bind(affiliate_id)
        .bind(&dest)
        .bind(code as i16)
        .fetch_one(&admin.pool)
        .await;
        match r {
            Ok((id, json)) => {
                admin.propagator.link(id).await;
                return Ok((StatusCode::CREATED, json));
            }
            Err(e) => {
                let taken = matches!(&e, sqlx::Error::Database(db)
                    if db.constraint() == Some("links_slug_key"));
                if !taken {
                    return Err(e.into());
                }
                if given_slug.is_some() {
                    return Err(ApiError::conflict("slug", "slug already taken"));
                }
            }
        }
    }
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "no free slug found; try again or give one",
        Some("slug"),
    ))
}

const LINK_PATCH_FIELDS: &[&str] = &["status", "destination"];

async fn patch_link(admin: &Admin, id: i64, b: Body) -> Reply {
    let status = b.choice_opt("status", &["active", "paused", "shadow_banned"])?;
    let dest = destination(&b, false)?;
    if status.is_none() && dest.is_none() {
        return Err(ApiError::bad_request(
            "nothing to change: give status or destination",
        ));
    }
    let json: Option<(i64, String)> = sqlx::query_as(&format!(
        "WITH t AS (UPDATE links SET status = coalesce($2, status),
                        destination = coalesce($3, destination),
                        version = version + 1, updated_at = now()
                    WHERE id = $1 RETURNING *)
         SELECT t.id, {LINK_JSON}::text FROM t"
    ))
    .bind(id)
    .bind(&status)
    .bind(&dest)
    .fetch_optional(&admin.pool)
    .await?;
    let (id, json) = json.ok_or_else(|| ApiError::not_found("link"))?;
    admin.propagator.link(id).await;
    Ok((StatusCode::OK, json))
}

/// 422 naming `field` unless `table` has a row `id`.
async fn exists(admin: &Admin, table: &str, id: i64, field: &str) -> Result<(), ApiError> {
    let found: bool = sqlx::query_scalar(&format!(
        "SELECT EXISTS (SELECT 1 FROM {table} WHERE id = $1)"
    ))
    .bind(id)
    .fetch_one(&admin.pool)
    .await?;
    if found {
        Ok(())
    } else {
        Err(ApiError::invalid(field, "does not exist"))
    }
}
