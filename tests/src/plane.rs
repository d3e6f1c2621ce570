//! The whole system for control-plane tests: a private Redis, a [`Stack`],
//! a collector with its admin API and an edge reading links from that
//! Redis and delivering to that collector; and the admin-API steps the
//! tests share (a network, an offer, an affiliate tree, links).

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};

use crate::{
    CollectorOpts, CollectorProc, EdgeOpts, EdgeProc, Redis, Resp, Stack, api, click_id_in,
    created, delivery_toml, enc, wait_for,
};

/// The edge's own fallback (no offer fallback applies).
pub const EDGE_FALLBACK: &str = "https://edge-fallback.example/";
/// How long any propagation or processing may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

#[derive(Debug)]
pub struct Plane {
    // Drop order: processes first, then the databases.
    pub edge: EdgeProc,
    pub collector: CollectorProc,
    pub redis: Redis,
    pub stack: Stack,
}

impl Plane {
    pub fn start(tag: &str) -> Plane {
        let redis = Redis::start();
        let stack = Stack::new(tag);
        let collector = CollectorProc::start_with(
            &stack,
            &CollectorOpts {
                admin_redis: Some(redis.url()),
                ..CollectorOpts::default()
            },
        );
        let edge = edge_for(&redis, &[collector.udp], 1);
        Plane {
            edge,
            collector,
            redis,
            stack,
        }
    }

    pub fn admin(&self) -> SocketAddr {
        self.collector
            .admin
            .expect("the collector serves its admin API")
    }

    /// POST `body` to `/api/v1/{what}`; the created resource.
    pub fn create(&self, what: &str, body: Value) -> Value {
        created(
            what,
            api(
                self.admin(),
                "POST",
                &format!("/api/v1/{what}"),
                Some(&body.to_string()),
            ),
        )
    }

    /// A network with `token`, an offer on it and a chain of `depth`
    /// affiliates (root first); returns (network, offer, affiliates).
    pub fn offer_with_tree(&self, token: &str, offer: Value, depth: usize) -> (i64, i64, Vec<i64>) {
        let network = id(&self.create("networks", json!({"name": "net", "postback_token": token})));
        let mut body = offer;
        body["network_id"] = json!(network);
        let offer = id(&self.create("offers", body));
        let mut chain: Vec<i64> = Vec::new();
        for i in 0..depth {
            let mut a = json!({"name": format!("affiliate {i}")});
            if let Some(parent) = chain.last() {
                a["parent_id"] = json!(parent);
            }
            chain.push(id(&self.create("affiliates", a)));
        }
        (network, offer, chain)
    }

    /// A link of `offer` for `affiliate`; returns (id, slug) once the edge serves it.
    pub fn link(&self, offer: i64, affiliate: i64, destination: &str) -> (i64, String) {
        let l = self.create(
            "links",
            json!({"offer_id": offer, "affiliate_id": affiliate, "destination": destination}),
        );
        let slug = l["slug"].as_str().expect("slug").to_string();
        wait_for("the edge to serve the new link", DEADLINE, || {
            (self.edge.get(&format!("/c/{slug}")).status == 302).then_some(())
        });
        (id(&l), slug)
    }

    /// One click on `slug`: its click id.
    pub fn click(&self, slug: &str) -> String {
        let r = self.edge.get(&format!("/c/{slug}"));
        assert_eq!(r.status, 302, "click on {slug}");
        click_id_in(r.header("location").unwrap_or_default())
            .unwrap_or_else(|| panic!("no click id in {:?}", r.header("location")))
    }

    /// GET /postback with these parameters.
    pub fn postback(&self, params: &[(&str, &str)]) -> Resp {
        postback(&self.edge, params)
    }

    /// The conversions of `click_id`, from the admin API.
    pub fn conversions(&self, click_id: &str) -> Vec<Value> {
        let (status, v) = api(
            self.admin(),
            "GET",
            &format!("/api/v1/conversions?click_id={}", enc(click_id)),
            None,
        );
        assert_eq!(status, 200, "{v}");
        v["items"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until `click_id` has one conversion for which `ok` holds.
    pub fn conversion_until(
        &self,
        click_id: &str,
        what: &str,
        ok: impl Fn(&Value) -> bool,
    ) -> Value {
        wait_for(what, DEADLINE, || {
            let c = self.conversions(click_id);
            (c.len() == 1 && ok(&c[0])).then(|| c[0].clone())
        })
    }

    /// Unprocessed inbox rows.
    pub fn inbox_backlog(&self) -> usize {
        self.stack
            .pg("SELECT count(*) FROM postback_inbox WHERE processed_at IS NULL")
            .trim()
            .parse()
            .unwrap_or(usize::MAX)
    }
}

/// An edge reading `redis`, delivering to `collectors`.
pub fn edge_for(redis: &Redis, collectors: &[SocketAddr], edge_id: u16) -> EdgeProc {
    let e = EdgeProc::start(&EdgeOpts {
        edge_id,
        redis_url: Some(redis.url()),
        fallback_url: Some(EDGE_FALLBACK.into()),
        extra_toml: delivery_toml(collectors),
        // Misses are looked up in Redis; give a loaded machine time.
        env: vec![("AFFGATE_LINKS_MISS_TIMEOUT_MS".into(), "200".into())],
        ..EdgeOpts::default()
    });
    wait_for("the edge's /readyz", DEADLINE, || {
        (e.get("/readyz").status == 200).then_some(())
    });
    e
}

/// GET /postback on `edge` with these parameters.
pub fn postback(edge: &EdgeProc, params: &[(&str, &str)]) -> Resp {
    let q: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{k}={}", enc(v)))
        .collect();
    edge.get(&format!("/postback?{}", q.join("&")))
}

/// A resource's id.
pub fn id(v: &Value) -> i64 {
    v["id"].as_i64().unwrap_or_else(|| panic!("no id in {v}"))
}

/// `(affiliate_id, amount, status)` of a conversion's commissions, by level.
pub fn commissions(conversion: &Value) -> Vec<(i64, String, String)> {
    conversion["commissions"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    (
                        c["affiliate_id"].as_i64().unwrap_or(0),
                        c["amount"].as_str().unwrap_or("").to_string(),
                        c["status"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}
