//! The SDS stream state machine, with Istio's rules (pilot's `ShouldRespond`): the first request
//! must name the node; a NACK is logged, not answered; an ACK gets no reply; a stale nonce is
//! ignored; newly added names are answered; an empty name list unsubscribes.

use std::collections::BTreeSet;

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send these resources.
    Respond(Vec<String>),
    /// Nothing to send.
    Ignore(&'static str),
    /// Envoy rejected our last response.
    Nack(String),
}

/// Why the stream must end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamError(pub String);

/// One SDS stream's state.
#[derive(Debug, Default)]
pub struct StreamState {
    node: Option<String>,
    watched: BTreeSet<String>,
    last_nonce: Option<String>,
}

/// The parts of a DiscoveryRequest the state machine looks at.
#[derive(Debug, Clone, Default)]
pub struct Incoming<'a> {
    /// `node.id`, when the request carries a node.
    pub node_id: Option<&'a str>,
    /// `resource_names`.
    pub names: &'a [String],
    /// `response_nonce`.
    pub nonce: &'a str,
    /// `error_detail.message`, when set.
    pub error: Option<&'a str>,
}

impl StreamState {
    /// The names this stream watches.
    pub fn watched(&self) -> &BTreeSet<String> {
        &self.watched
    }

    /// The node id of the stream.
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// Remembers the nonce of a response just sent.
    pub fn sent(&mut self, nonce: String) {
        self.last_nonce = Some(nonce);
    }

    /// Classifies a request.
    pub fn on_request(&mut self, req: &Incoming<'_>) -> Result<Action, StreamError> {
        if self.node.is_none() {
            match req.node_id {
                Some(id) if !id.is_empty() => self.node = Some(id.to_owned()),
                _ => return Err(StreamError("missing node information".into())),
            }
        }
        if let Some(e) = req.error {
            return Ok(Action::Nack(e.to_owned()));
        }
        let names: BTreeSet<String> = req.names.iter().cloned().collect();
        if names.is_empty() {
            self.watched.clear();
            return Ok(Action::Ignore("unsubscribed"));
        }
        if req.nonce.is_empty() || self.last_nonce.is_none() {
            self.watched = names;
            return Ok(Action::Respond(self.watched.iter().cloned().collect()));
        }
        if self.last_nonce.as_deref() != Some(req.nonce) {
            return Ok(Action::Ignore("stale nonce"));
        }
        let added: Vec<String> = names.difference(&self.watched).cloned().collect();
        self.watched = names;
        if added.is_empty() {
            Ok(Action::Ignore("ack"))
        } else {
            Ok(Action::Respond(added))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn first_request_must_name_the_node() {
        let mut s = StreamState::default();
        let n = names(&["default"]);
        assert!(
            s.on_request(&Incoming {
                names: &n,
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            s.on_request(&Incoming {
                node_id: Some(""),
                names: &n,
                ..Default::default()
            })
            .is_err()
        );
        let a = s
            .on_request(&Incoming {
                node_id: Some("sidecar~1"),
                names: &n,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(a, Action::Respond(n.clone()));
        // Later requests need not repeat the node (set_node_on_first_message_only).
        s.sent("n1".into());
        assert_eq!(
            s.on_request(&Incoming {
                names: &n,
                nonce: "n1",
                ..Default::default()
            })
            .unwrap(),
            Action::Ignore("ack")
        );
    }

    #[test]
    fn ack_nack_stale_added_removed() {
        let mut s = StreamState::default();
        let d = names(&["default"]);
        let both = names(&["ROOTCA", "default"]);
        assert_eq!(
            s.on_request(&Incoming {
                node_id: Some("n"),
                names: &d,
                ..Default::default()
            })
            .unwrap(),
            Action::Respond(d.clone())
        );
        s.sent("1".into());
        // NACK: logged, not answered.
        assert_eq!(
            s.on_request(&Incoming {
                names: &d,
                nonce: "1",
                error: Some("bad cert"),
                ..Default::default()
            })
            .unwrap(),
            Action::Nack("bad cert".into())
        );
        // ACK.
        assert_eq!(
            s.on_request(&Incoming {
                names: &d,
                nonce: "1",
                ..Default::default()
            })
            .unwrap(),
            Action::Ignore("ack")
        );
        // Stale nonce.
        assert_eq!(
            s.on_request(&Incoming {
                names: &both,
                nonce: "0",
                ..Default::default()
            })
            .unwrap(),
            Action::Ignore("stale nonce")
        );
        assert_eq!(s.watched().len(), 1);
        // Added name: only the new one is answered.
        assert_eq!(
            s.on_request(&Incoming {
                names: &both,
                nonce: "1",
                ..Default::default()
            })
            .unwrap(),
            Action::Respond(names(&["ROOTCA"]))
        );
        s.sent("2".into());
        // Removed name: watch shrinks, no answer.
        assert_eq!(
            s.on_request(&Incoming {
                names: &d,
                nonce: "2",
                ..Default::default()
            })
            .unwrap(),
            Action::Ignore("ack")
        );
        assert_eq!(s.watched().iter().cloned().collect::<Vec<_>>(), d);
        // Empty list: unsubscribe.
        assert_eq!(
            s.on_request(&Incoming {
                names: &[],
                nonce: "2",
                ..Default::default()
            })
            .unwrap(),
            Action::Ignore("unsubscribed")
        );
        assert!(s.watched().is_empty());
        // Reconnect-style request (empty nonce) answers everything asked.
        assert_eq!(
            s.on_request(&Incoming {
                names: &both,
                ..Default::default()
            })
            .unwrap(),
            Action::Respond(both.clone())
        );
    }
}
