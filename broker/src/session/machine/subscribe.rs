//! SUBSCRIBE and UNSUBSCRIBE: filter and ACL checks, the router, stored subscriptions and
//! retained messages sent on subscribe.

use super::*;

impl Machine {
    pub(super) fn on_subscribe(&mut self, subscribe: Subscribe, out: &mut BytesMut) -> Flow {
        let identifier = subscribe.properties.as_ref().and_then(|p| p.id);
        let limits = &self.broker.config.limits;
        let mut return_codes = Vec::with_capacity(subscribe.filters.len());
        let mut retained: Vec<Delivery> = Vec::new();
        let mut batch = self.session.write_batch();
        for filter in &subscribe.filters {
            let parsed = match parse_filter(&filter.path, &self.broker.topic_limits) {
                Ok(parsed) => parsed,
                Err(_) => {
                    return_codes.push(if self.v5() {
                        SubscribeReasonCode::TopicFilterInvalid
                    } else {
                        SubscribeReasonCode::Failure
                    });
                    continue;
                }
            };
            // `$share/{group}/{filter}` is authorized on `{filter}`.
            if !self.acl.may_subscribe(parsed.topic_filter()) {
                self.broker.metrics.subscriptions_denied_acl.inc();
                return_codes.push(if self.v5() {
                    SubscribeReasonCode::NotAuthorized
                } else {
                    SubscribeReasonCode::Failure
                });
                continue;
            }
            let is_shared = matches!(parsed, ParsedFilter::Shared { .. });
            if is_shared && filter.nolocal {
                return Flow::Close(
                    DisconnectReasonCode::ProtocolError,
                    "No Local on a shared subscription",
                );
            }
            if !self.session.subscriptions.contains_key(&filter.path)
                && self.session.subscriptions.len() >= limits.max_subscriptions_per_client
            {
                return_codes.push(if self.v5() {
                    SubscribeReasonCode::QuotaExceeded
                } else {
                    SubscribeReasonCode::Failure
                });
                continue;
            }
            let options = SubscriptionOptions {
                qos: filter.qos,
                no_local: filter.nolocal,
                retain_as_published: filter.preserve_retain,
                retain_handling: filter.retain_forward_rule.clone(),
                identifier,
            };
            if self.session.stored {
                batch.push(WriteOp::PutSubscription {
                    client: self.session.client_id.clone(),
                    filter: filter.path.clone(),
                    options: options.clone(),
                });
            }
            let outcome =
                self.broker
                    .router
                    .subscribe(&self.session.mailbox, parsed, options.clone());
            self.session
                .subscriptions
                .insert(filter.path.clone(), options);
            return_codes.push(SubscribeReasonCode::Success(filter.qos));
            // Retained messages go to new subscriptions per Retain Handling; never to shared
            // subscriptions (v5 §4.8.2).
            let send_retained = !is_shared
                && match filter.retain_forward_rule {
                    RetainForwardRule::OnEverySubscribe => true,
                    RetainForwardRule::OnNewSubscribe => !outcome.existed,
                    RetainForwardRule::Never => false,
                };
            if let (true, ParsedFilter::Plain(plain)) = (send_retained, parsed) {
                let room = limits
                    .max_queued_messages
                    .saturating_sub(self.pending.len() + retained.len());
                for message in self.broker.router.retained_matching(plain, room) {
                    retained.push(Delivery {
                        qos: min_qos(message.qos, filter.qos),
                        message,
                        retain: true,
                        subscription_ids: identifier.into_iter().collect(),
                        seq: None,
                        dup: false,
                    });
                }
            }
        }
        let shared = subscribe
            .filters
            .iter()
            .any(|f| f.path.starts_with("$share/"));
        if shared {
            self.shared_subscriptions_changed();
        }
        // A persistent session's SUBACK waits until the subscription is durable.
        let wait = self.broker.storage.submit_nonempty(batch);
        let wait = self.with_directory(wait, shared);
        self.reply(
            Packet::SubAck(SubAck {
                pkid: subscribe.pkid,
                return_codes,
                properties: None,
            }),
            wait,
            OnError::Close,
            out,
        );
        // After the SUBACK, in the order found [MQTT-3.8.4-4].
        self.pending.extend(retained);
        Flow::Continue
    }

    pub(super) fn on_unsubscribe(&mut self, unsubscribe: Unsubscribe, out: &mut BytesMut) -> Flow {
        let mut reasons = Vec::with_capacity(unsubscribe.filters.len());
        let mut batch = self.session.write_batch();
        for filter in &unsubscribe.filters {
            let reason = match parse_filter(filter, &self.broker.topic_limits) {
                Err(_) => UnsubAckReason::TopicFilterInvalid,
                Ok(parsed) => {
                    self.broker
                        .router
                        .unsubscribe(&self.session.client_id, parsed);
                    if self.session.stored {
                        batch.push(WriteOp::DeleteSubscription {
                            client: self.session.client_id.clone(),
                            filter: filter.clone(),
                        });
                    }
                    if self.session.subscriptions.remove(filter).is_some() {
                        UnsubAckReason::Success
                    } else {
                        UnsubAckReason::NoSubscriptionExisted
                    }
                }
            };
            reasons.push(reason);
        }
        let shared = unsubscribe.filters.iter().any(|f| f.starts_with("$share/"));
        if shared {
            self.shared_subscriptions_changed();
        }
        let wait = self.broker.storage.submit_nonempty(batch);
        let wait = self.with_directory(wait, shared);
        self.reply(
            Packet::UnsubAck(UnsubAck {
                pkid: unsubscribe.pkid,
                reasons,
                properties: None,
            }),
            wait,
            OnError::Close,
            out,
        );
        Flow::Continue
    }

    /// Several active nodes: a persistent session's subscription change, and a clean session's
    /// change of its shared subscriptions (`shared`), is in the session directory before the
    /// SUBACK/UNSUBACK, so every node routes with it (every node picks a shared group's member
    /// among all of them, `router::agreed_pick`).
    fn with_directory(
        &self,
        wait: Option<crate::storage::Completion>,
        shared: bool,
    ) -> Option<crate::storage::Completion> {
        let Some(cluster) = self.broker.cluster() else {
            return wait;
        };
        if !self.session.is_persistent() && !shared {
            return wait;
        }
        let announced = cluster.announce_completion(&self.session);
        Some(match wait {
            Some(w) => crate::storage::join_completions(w, announced),
            None => announced,
        })
    }

    /// Tells the storage backend the APPLICATION client's shared subscriptions (see
    /// `Storage::application_shared`).
    pub(super) fn shared_subscriptions_changed(&self) {
        if self.session.kind == crate::storage::ClientKind::Application {
            self.broker.application_shared(&self.session);
        }
    }
}
