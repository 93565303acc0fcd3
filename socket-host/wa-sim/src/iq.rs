//! Answers to what a logged-in client sends: the IQs of the connect sequence (pre-key count, upload,
//! rotation and digest; passive/active; props; blocklist; privacy; own-device usync), keepalive pings,
//! pre-key fetches, and acks for messages and receipts.
//!
//! Every answer is shaped so the engine's own response parsers accept it: a bare `<iq type="result"/>`
//! where the engine expects a body makes it log parse warnings, and no answer at all makes it wait on a
//! timeout.

use base64::Engine as _;
use sha2::{Digest, Sha256};
use whatsapp_rust::wacore::iq::prekeys::{OneTimePreKeyNode, PreKeyBundleUserNode, SignedPreKeyNode};
use whatsapp_rust::wacore::prekeys::compute_key_bundle_digest;
use whatsapp_rust::wacore::protocol::ProtocolNode;
use whatsapp_rust::wacore_binary::builder::NodeBuilder;
use whatsapp_rust::wacore_binary::{Jid, Node, NodeContentRef, NodeRef, Server};

use crate::keys::now_secs;
use crate::state::{DeviceEntry, KeyBundle, Shared, SignedPreKey, State};

pub(crate) const SERVER: &str = "s.whatsapp.net";
/// The props hash this server hands out; a client presenting it gets an empty delta.
const PROPS_HASH: &str = "wa-sim-1";

/// What to do with a stanza.
pub(crate) enum Outcome {
    /// Send these nodes, in order.
    Reply(Vec<Node>),
    /// A keepalive ping: answer according to the pong setting.
    Ping(String),
    /// Nothing to send.
    Nothing,
}

/// Handles one stanza from the logged-in device `jid`.
pub(crate) fn handle(shared: &Shared, jid: &str, node: &NodeRef<'_>) -> Outcome {
    match &*node.tag {
        "iq" => iq(shared, jid, node),
        "message" | "receipt" | "call" => ack(node),
        _ => Outcome::Nothing,
    }
}

fn attr(node: &NodeRef<'_>, key: &str) -> String {
    node.get_attr(key).map(|v| v.as_str().into_owned()).unwrap_or_default()
}

fn iq(shared: &Shared, jid: &str, node: &NodeRef<'_>) -> Outcome {
    let id = attr(node, "id");
    let xmlns = attr(node, "xmlns");
    let kind = attr(node, "type");
    if kind != "get" && kind != "set" {
        // Results and errors for server-initiated IQs need no answer.
        return Outcome::Nothing;
    }
    if xmlns != "w:p" {
        shared.update(|s| s.rec.iq(jid, &xmlns));
    }
    let first = node.children().and_then(|c| c.first());
    let child = first.map(|c| &*c.tag).unwrap_or("");
    let reply = match (xmlns.as_str(), kind.as_str(), child) {
        ("w:p", _, _) => return Outcome::Ping(id),
        ("passive", _, "active") => {
            // Leaving passive mode is when the server delivers the offline backlog, then says how much
            // it was.
            let queued = shared.update(|s| crate::relay::take_offline(s, jid));
            let offline = NodeBuilder::new("ib")
                .attr("from", SERVER)
                .children([NodeBuilder::new("offline").attr("count", queued.len().to_string()).build()])
                .build();
            let mut reply = Vec::with_capacity(queued.len() + 2);
            reply.push(result(&id).build());
            reply.extend(queued);
            reply.push(offline);
            return Outcome::Reply(reply);
        }
        ("encrypt", "get", "count") => {
            let held = shared.lock().devices.get(jid).map_or(0, |d| d.keys.prekeys.len());
            result(&id).children([NodeBuilder::new("count").attr("value", held.to_string()).build()]).build()
        }
        ("encrypt", "get", "digest") => digest(shared, jid, &id),
        ("encrypt", "get", "key") => fetch_bundles(shared, &id, first.expect("child exists")),
        ("encrypt", "set", "rotate") => {
            if let Some(skey) = first.and_then(|r| r.get_optional_child("skey")).and_then(parse_skey) {
                shared.update(|s| with_device(s, jid, |d| d.keys.signed_pre_key = Some(skey)));
            }
            result(&id).build()
        }
        ("encrypt", "set", _) => {
            upload(shared, jid, node);
            result(&id).build()
        }
        ("abt", _, _) => props(&id, first),
        ("blocklist", "get", _) => result(&id).children([NodeBuilder::new("list").build()]).build(),
        ("privacy", "get", _) => privacy(&id),
        ("usync", _, "usync") => usync(shared, &id, first.expect("child exists")),
        ("w:sync:app:state", "set", "sync") => app_state(&id, first.expect("child exists")),
        ("md", "set", "remove-companion-device") => {
            // The companion logs itself out: the phone forgets it, so its credentials never log in again.
            shared.update(|s| with_device(s, jid, |d| d.revoked = true));
            result(&id).build()
        }
        _ => {
            tracing::debug!(xmlns = %xmlns, kind = %kind, child = %child, "answering unhandled iq with an empty result");
            result(&id).build()
        }
    };
    Outcome::Reply(vec![reply])
}

pub(crate) fn result(id: &str) -> NodeBuilder {
    NodeBuilder::new("iq").attr("from", SERVER).attr("id", id.to_owned()).attr("type", "result")
}

fn error(id: &str, code: u16, text: &'static str) -> Node {
    NodeBuilder::new("iq")
        .attr("from", SERVER)
        .attr("id", id.to_owned())
        .attr("type", "error")
        .children([NodeBuilder::new("error").attr("code", code.to_string()).attr("text", text).build()])
        .build()
}

/// The answer to a keepalive ping.
pub(crate) fn pong(id: &str) -> Node {
    result(id).attr("t", now_secs().to_string()).build()
}

fn ack(node: &NodeRef<'_>) -> Outcome {
    let id = attr(node, "id");
    if id.is_empty() {
        return Outcome::Nothing;
    }
    let mut ack = NodeBuilder::new("ack").attr("class", node.tag.to_string()).attr("id", id);
    let to = attr(node, "to");
    if !to.is_empty() {
        ack = ack.attr("from", to);
    }
    if node.tag == "message" {
        ack = ack.attr("t", now_secs().to_string());
    }
    Outcome::Reply(vec![ack.build()])
}

fn with_device(s: &mut State, jid: &str, f: impl FnOnce(&mut DeviceEntry)) {
    if let Some(d) = s.devices.get_mut(jid) {
        f(d);
    }
}

fn bytes_of<'a>(node: &'a NodeRef<'_>, tag: &str) -> Option<&'a [u8]> {
    match node.get_optional_child(tag)?.content.as_ref()? {
        NodeContentRef::Bytes(b) => Some(b),
        _ => None,
    }
}

fn id3(bytes: &[u8]) -> Option<u32> {
    (bytes.len() == 3).then(|| u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]))
}

fn parse_skey(skey: &NodeRef<'_>) -> Option<SignedPreKey> {
    Some(SignedPreKey {
        id: id3(bytes_of(skey, "id")?)?,
        public: bytes_of(skey, "value")?.try_into().ok()?,
        signature: bytes_of(skey, "signature").filter(|s| s.len() == 64)?.to_vec(),
    })
}

/// Stores an uploaded key bundle: registration id, identity, signed pre-key and one-time pre-keys.
fn upload(shared: &Shared, jid: &str, node: &NodeRef<'_>) {
    let registration = bytes_of(node, "registration").and_then(|b| <[u8; 4]>::try_from(b).ok()).map(u32::from_be_bytes);
    let identity = bytes_of(node, "identity").and_then(|b| <[u8; 32]>::try_from(b).ok());
    let skey = node.get_optional_child("skey").and_then(parse_skey);
    let keys: Vec<(u32, [u8; 32])> = node
        .get_optional_child("list")
        .map(|l| {
            l.get_children_by_tag("key")
                .filter_map(|k| Some((id3(bytes_of(k, "id")?)?, bytes_of(k, "value")?.try_into().ok()?)))
                .collect()
        })
        .unwrap_or_default();
    tracing::debug!(device = %jid, prekeys = keys.len(), "pre-keys uploaded");
    shared.update(|s| {
        with_device(s, jid, |d| {
            d.keys.registration_id = registration.or(d.keys.registration_id);
            d.keys.identity = identity.or(d.keys.identity);
            if skey.is_some() {
                d.keys.signed_pre_key = skey;
            }
            d.keys.prekeys.extend(keys);
            d.keys.server_has_prekeys = true;
        })
    });
}

/// The digest of the key bundle the server holds; 404 when it holds none, which makes the engine upload.
fn digest(shared: &Shared, jid: &str, id: &str) -> Node {
    let s = shared.lock();
    let Some(d) = s.devices.get(jid) else {
        return error(id, 404, "item-not-found");
    };
    let k = &d.keys;
    let (Some(reg), Some(identity), Some(skey), true) =
        (k.registration_id, k.identity, k.signed_pre_key.as_ref(), k.server_has_prekeys)
    else {
        return error(id, 404, "item-not-found");
    };
    let publics: Vec<&[u8]> = k.prekeys.values().map(|p| &p[..]).collect();
    let hash = compute_key_bundle_digest(&identity, &skey.public, &skey.signature, &publics);
    let list = k.prekeys.keys().map(|i| NodeBuilder::new("id").bytes(i.to_be_bytes()[1..].to_vec()).build());
    let digest = NodeBuilder::new("digest")
        .children([
            NodeBuilder::new("registration").bytes(reg.to_be_bytes().to_vec()).build(),
            NodeBuilder::new("type").bytes(vec![5]).build(),
            NodeBuilder::new("identity").bytes(identity.to_vec()).build(),
            SignedPreKeyNode::new(skey.id, skey.public.to_vec(), skey.signature.clone()).into_node(),
            NodeBuilder::new("list").children(list).build(),
            NodeBuilder::new("hash").bytes(hash).build(),
        ])
        .build();
    result(id).children([digest]).build()
}

/// Pre-key bundles for the devices (and contacts' phones) asked for; each one-time pre-key is handed out
/// once.
fn fetch_bundles(shared: &Shared, id: &str, key: &NodeRef<'_>) -> Node {
    let wanted: Vec<Jid> = key.get_children_by_tag("user").filter_map(|u| u.attrs().optional_jid("jid")).collect();
    let mut s = shared.lock();
    let users = wanted
        .into_iter()
        .map(|jid| {
            let found = s.devices.values_mut().find(|d| {
                d.jid == jid
                    || d.lid.as_ref().is_some_and(|l| l.user == jid.user && l.device == jid.device && jid.is_lid())
            });
            let bundle = match found {
                Some(d) => user_bundle(&jid, &mut d.keys, d.account.as_ref().map(|a| a.device_identity.clone())),
                // A phone has no device identity to show: it is the account.
                None => match s.contact_for(&jid) {
                    Some(phone) => s.contacts.get_mut(&phone).and_then(|c| user_bundle(&jid, &mut c.public, None)),
                    None => None,
                },
            };
            match bundle {
                Some(b) => b.into_node(),
                None => NodeBuilder::new("user")
                    .attr("jid", jid)
                    .children([NodeBuilder::new("error").attr("code", "404").attr("text", "item-not-found").build()])
                    .build(),
            }
        })
        .collect::<Vec<_>>();
    drop(s);
    result(id).children([NodeBuilder::new("list").children(users).build()]).build()
}

fn user_bundle(jid: &Jid, k: &mut KeyBundle, device_identity: Option<Vec<u8>>) -> Option<PreKeyBundleUserNode> {
    let (reg, identity, skey) = (k.registration_id?, k.identity?, k.signed_pre_key.clone()?);
    let one_time = k.prekeys.pop_first().map(|(i, p)| OneTimePreKeyNode::new(i, p.to_vec()));
    Some(PreKeyBundleUserNode {
        jid: jid.clone(),
        registration_id: reg,
        identity_key: identity.to_vec(),
        signed_pre_key: SignedPreKeyNode::new(skey.id, skey.public.to_vec(), skey.signature),
        one_time_pre_key: one_time,
        device_identity,
    })
}

/// App-state sync for an account with no app state: every requested collection, empty, at the version the
/// client asked from (a freshly paired client waits for these before it reports itself connected).
fn app_state(id: &str, sync: &NodeRef<'_>) -> Node {
    let collections = sync.get_children_by_tag("collection").map(|c| {
        let mut n = NodeBuilder::new("collection").attr("name", attr(c, "name"));
        let version = attr(c, "version");
        n = n.attr("version", if version.is_empty() { "0".to_owned() } else { version });
        n.build()
    });
    result(id).children([NodeBuilder::new("sync").children(collections.collect::<Vec<_>>()).build()]).build()
}

fn props(id: &str, request: Option<&NodeRef<'_>>) -> Node {
    let known = request.and_then(|r| r.get_attr("hash")).is_some_and(|h| h.as_str() == PROPS_HASH);
    let props = NodeBuilder::new("props")
        .attr("protocol", "1")
        .attr("ab_key", "wa-sim")
        .attr("hash", PROPS_HASH)
        .attr("refresh", "86400")
        .attr("delta_update", if known { "true" } else { "false" })
        .build();
    result(id).children([props]).build()
}

fn privacy(id: &str) -> Node {
    let categories = [
        ("last", "all"),
        ("online", "all"),
        ("profile", "all"),
        ("status", "all"),
        ("groupadd", "all"),
        ("readreceipts", "all"),
        ("calladd", "all"),
    ]
    .map(|(name, value)| NodeBuilder::new("category").attr("name", name).attr("value", value).build());
    result(id).children([NodeBuilder::new("privacy").children(categories).build()]).build()
}

/// A usync query: device lists (with the signed key-index list for accounts with companions), LIDs and
/// contact status for the users asked about.
fn usync(shared: &Shared, id: &str, request: &NodeRef<'_>) -> Node {
    let protocols: Vec<String> = request
        .get_optional_child("query")
        .and_then(|q| q.children())
        .map(|c| c.iter().map(|p| p.tag.to_string()).collect())
        .unwrap_or_default();
    let users: Vec<Jid> = request
        .get_optional_child("list")
        .map(|l| l.get_children_by_tag("user").filter_map(|u| u.attrs().optional_jid("jid")).collect())
        .unwrap_or_default();
    let s = shared.lock();
    let user_nodes: Vec<Node> = users
        .iter()
        .map(|user| {
            let bare = user.to_non_ad();
            let devices: Vec<&DeviceEntry> = s.devices_of(&bare.user, bare.server == Server::Lid).collect();
            let children = protocols.iter().filter_map(|p| match p.as_str() {
                "devices" => Some(device_list(&devices)),
                "lid" => devices
                    .iter()
                    .find_map(|d| d.lid.as_ref())
                    .map(|l| NodeBuilder::new("lid").attr("val", Jid::lid(l.user.as_str())).build()),
                "contact" => {
                    let known = !devices.is_empty() || (bare.is_pn() && s.contacts.contains_key(bare.user.as_str()));
                    Some(NodeBuilder::new("contact").attr("type", if known { "in" } else { "out" }).build())
                }
                _ => None,
            });
            NodeBuilder::new("user").attr("jid", bare.clone()).children(children.collect::<Vec<_>>()).build()
        })
        .collect();
    drop(s);
    let mut usync = NodeBuilder::new("usync");
    for key in ["sid", "mode", "context", "index", "last"] {
        if let Some(v) = request.get_attr(key) {
            usync = usync.attr(key, v.as_str().into_owned());
        }
    }
    result(id).children([usync.children([NodeBuilder::new("list").children(user_nodes).build()]).build()]).build()
}

fn device_list(devices: &[&DeviceEntry]) -> Node {
    let mut ids: Vec<(u16, Option<u32>)> = vec![(0, None)];
    let mut key_index_list = None;
    for d in devices {
        // Without the account key there is no key-index list, and the engine ignores companions that lack
        // one; such devices are left out and only the phone is listed.
        if let Some(a) = &d.account {
            ids.push((d.jid.device, Some(a.key_index)));
            key_index_list.get_or_insert((a.created_secs, a.key_index_list.clone()));
        }
    }
    let mut h = Sha256::new();
    for (dev, _) in &ids {
        h.update(dev.to_be_bytes());
    }
    let hash = format!("2:{}", base64::engine::general_purpose::STANDARD.encode(&h.finalize()[..6]));
    let device_nodes = ids.into_iter().map(|(dev, key_index)| {
        let mut n = NodeBuilder::new("device").attr("id", dev.to_string());
        if let Some(k) = key_index {
            n = n.attr("key-index", k.to_string());
        }
        n.build()
    });
    let mut children = vec![NodeBuilder::new("device-list").attr("hash", hash).children(device_nodes).build()];
    if let Some((ts, bytes)) = key_index_list {
        children.push(NodeBuilder::new("key-index-list").attr("ts", ts.to_string()).bytes(bytes).build());
    }
    NodeBuilder::new("devices").children(children).build()
}
