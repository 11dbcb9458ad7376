package enforcer

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/catalog"
	"github.com/meterd/meterd/schemas"
)

// Signatures: billing webhooks arrive signed the way Stripe signs them, and
// notifications leave signed the same way, so one receiver-side routine
// checks both.
const (
	// StripeSignatureHeader carries the signature of a billing webhook.
	StripeSignatureHeader = "Stripe-Signature"
	// SignatureHeader carries the signature of a notification.
	SignatureHeader = "Meterd-Signature"
	// DefaultWebhookTolerance bounds the age of a signed timestamp.
	DefaultWebhookTolerance = 5 * time.Minute
	// maxWebhookBody bounds a webhook body; Stripe events are a few KiB.
	maxWebhookBody = 1 << 20
)

// Errors of VerifySignature.
var (
	ErrBadSignature   = errors.New("enforcer: signature does not match")
	ErrStaleSignature = errors.New("enforcer: signature timestamp outside the tolerance")
	ErrNoSignature    = errors.New("enforcer: malformed or missing signature header")
)

// Sign returns the signature header value of body signed at t with secret:
// t=<unix seconds>,v1=<hex HMAC-SHA256 of "<unix seconds>.<body>">.
func Sign(body []byte, secret string, t time.Time) string {
	ts := strconv.FormatInt(t.Unix(), 10)
	return "t=" + ts + ",v1=" + hex.EncodeToString(signature(ts, body, secret))
}

func signature(ts string, body []byte, secret string) []byte {
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(ts))
	mac.Write([]byte{'.'})
	mac.Write(body)
	return mac.Sum(nil)
}

// VerifySignature checks a signature header made by Sign (or by Stripe): one
// of its v1 values must be the HMAC of its timestamp and body, and the
// timestamp must lie within tolerance of now. The comparison takes constant
// time.
func VerifySignature(header string, body []byte, secret string, now time.Time, tolerance time.Duration) error {
	var ts string
	var sigs [][]byte
	for part := range strings.SplitSeq(header, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			continue
		}
		switch k {
		case "t":
			ts = v
		case "v1":
			if sig, err := hex.DecodeString(v); err == nil && len(sig) == sha256.Size {
				sigs = append(sigs, sig)
			}
		}
	}
	unix, err := strconv.ParseInt(ts, 10, 64)
	if err != nil || len(sigs) == 0 {
		return ErrNoSignature
	}
	want := signature(ts, body, secret)
	match := 0
	for _, sig := range sigs {
		match |= subtleEqual(sig, want)
	}
	if match == 0 {
		return ErrBadSignature
	}
	if age := now.Sub(time.Unix(unix, 0)); age > tolerance || age < -tolerance {
		return ErrStaleSignature
	}
	return nil
}

// subtleEqual is hmac.Equal as 0 or 1, so a loop over several candidates
// does not stop at the first match.
func subtleEqual(a, b []byte) int {
	if hmac.Equal(a, b) {
		return 1
	}
	return 0
}

// Invoice states of a billing record. Paid and void are absorbing: a late
// or replayed payment_failed for a settled invoice changes nothing.
const (
	invoiceFailed         = "failed"
	invoiceActionRequired = "action_required"
	invoicePaid           = "paid"
	invoiceVoid           = "void"
)

// Bounds of a billing record.
const (
	maxSeenEvents = 256
	// settledRetention: a settled invoice is kept this long after its
	// newest event (Stripe retries a delivery for 3 days), then dropped.
	settledRetention = 90 * 24 * time.Hour
)

// billingRecord is what the enforcer knows about a tenant's payments: the
// value of the tenant's key in the meterd-billing bucket. It is built from
// the content and timestamps of events, never from their arrival order, so
// every order of the same events gives the same record (up to the seen ids).
type billingRecord struct {
	Invoices      map[string]stamped `json:"invoices,omitempty"`
	Subscriptions map[string]stamped `json:"subscriptions,omitempty"`
	// SeenEventIDs are the newest event ids applied, oldest first.
	SeenEventIDs []string `json:"seen_event_ids,omitempty"`
}

// stamped is an invoice state or a subscription status and the creation time
// of the event that set it.
type stamped struct {
	State string    `json:"state"`
	At    time.Time `json:"at"`
}

// billingEvent is the part of a Stripe event the enforcer reads.
type billingEvent struct {
	ID      string `json:"id"`
	Type    string `json:"type"`
	Created int64  `json:"created"`
	Data    struct {
		Object struct {
			ID       string          `json:"id"`
			Customer json.RawMessage `json:"customer"`
			Status   string          `json:"status"`
		} `json:"object"`
	} `json:"data"`
}

// decodeEvent reads a webhook body. It fails for a body that is not an event
// with an id and a type, and for an event of a known type without created
// or data.object.id; known is false for a type meterd does not use.
func decodeEvent(body []byte) (ev *billingEvent, eff eventEffect, known bool, err error) {
	ev = &billingEvent{}
	if err := json.Unmarshal(body, ev); err != nil || ev.ID == "" || ev.Type == "" {
		return ev, eff, false, errors.New("the body is not a billing event with an id and a type")
	}
	if eff, known = effectOf(ev); !known {
		return ev, eff, false, nil
	}
	if ev.Data.Object.ID == "" || ev.Created <= 0 {
		return ev, eff, true, errors.New("the event needs created and data.object.id")
	}
	return ev, eff, true, nil
}

// customer returns data.object.customer: an id, or an expanded customer
// object with one.
func (ev *billingEvent) customer() string {
	raw := ev.Data.Object.Customer
	var id string
	if json.Unmarshal(raw, &id) == nil {
		return id
	}
	var obj struct {
		ID string `json:"id"`
	}
	if json.Unmarshal(raw, &obj) == nil {
		return obj.ID
	}
	return ""
}

// eventEffect is what an event of a known type sets: an invoice's state or
// a subscription's status.
type eventEffect struct {
	invoice bool
	state   string
}

// effectOf returns the effect of ev; ok is false for a type the enforcer
// ignores.
func effectOf(ev *billingEvent) (eff eventEffect, ok bool) {
	switch ev.Type {
	case "invoice.payment_failed":
		return eventEffect{invoice: true, state: invoiceFailed}, true
	case "invoice.payment_action_required":
		return eventEffect{invoice: true, state: invoiceActionRequired}, true
	case "invoice.paid", "invoice.payment_succeeded":
		return eventEffect{invoice: true, state: invoicePaid}, true
	case "invoice.voided":
		return eventEffect{invoice: true, state: invoiceVoid}, true
	case "customer.subscription.created", "customer.subscription.updated":
		return eventEffect{state: ev.Data.Object.Status}, true
	case "customer.subscription.deleted":
		return eventEffect{state: "canceled"}, true
	}
	return eventEffect{}, false
}

// seen reports whether the record already applied the event id.
func (r *billingRecord) seen(id string) bool { return slices.Contains(r.SeenEventIDs, id) }

// apply records the effect of event id created at at on object (an invoice
// or a subscription id). Per invoice, paid and void are absorbing, and
// otherwise the newest event wins; per subscription the newest event wins.
// Two events of the same second (Stripe's resolution) tie, and the worse
// status wins the tie: what the record holds depends on the set of events,
// never on their order.
func (r *billingRecord) apply(id string, eff eventEffect, object string, at time.Time) {
	m := &r.Subscriptions
	if eff.invoice {
		m = &r.Invoices
	}
	if *m == nil {
		*m = map[string]stamped{}
	}
	cur, ok := (*m)[object]
	switch {
	case !ok:
		(*m)[object] = stamped{State: eff.state, At: at}
	case eff.invoice && settled(cur.State):
		// absorbing
	case eff.invoice && settled(eff.state),
		at.After(cur.At),
		at.Equal(cur.At) && worse(statusOf(eff.invoice, eff.state), statusOf(eff.invoice, cur.State)):
		(*m)[object] = stamped{State: eff.state, At: at}
	}
	r.SeenEventIDs = append(r.SeenEventIDs, id)
	if n := len(r.SeenEventIDs) - maxSeenEvents; n > 0 {
		r.SeenEventIDs = slices.Delete(r.SeenEventIDs, 0, n)
	}
	r.prune()
}

func settled(state string) bool { return state == invoicePaid || state == invoiceVoid }

// prune drops settled invoices whose event is older than settledRetention
// before the newest event of the record, so records stay small; the bound
// depends on event times only, never on the clock.
func (r *billingRecord) prune() {
	var newest time.Time
	for _, m := range []map[string]stamped{r.Invoices, r.Subscriptions} {
		for _, s := range m {
			if s.At.After(newest) {
				newest = s.At
			}
		}
	}
	maps.DeleteFunc(r.Invoices, func(_ string, s stamped) bool {
		return settled(s.State) && newest.Sub(s.At) > settledRetention
	})
}

// statusOf is the billing status an invoice state or a subscription
// status stands for.
func statusOf(invoice bool, state string) string {
	if !invoice {
		return subscriptionStatus(state)
	}
	switch state {
	case invoiceFailed:
		return catalog.StatusPastDue
	case invoiceActionRequired:
		return StatusIncomplete
	}
	return catalog.StatusActive
}

// subscriptionStatus maps a Stripe subscription status to a billing status.
func subscriptionStatus(s string) string {
	switch s {
	case "active", "trialing":
		return catalog.StatusActive
	case "incomplete", "incomplete_expired", "paused":
		return StatusIncomplete
	case "past_due", "unpaid", "canceled":
		return s
	}
	return catalog.StatusActive // unknown to us: not a reason to block
}

// statuses returns the billing statuses the record contributes: one per
// open invoice, and the status of the latest subscription (newest event; a
// tie goes to the worse status). A canceled subscription counts only when
// every subscription is canceled: replacing a subscription by a new one
// must not suspend the tenant when the old one's deletion arrives last.
func (r *billingRecord) statuses() []string {
	var out []string
	for _, inv := range r.Invoices {
		if st := statusOf(true, inv.State); st != catalog.StatusActive {
			out = append(out, st)
		}
	}
	var latest stamped
	found, live := false, false
	for _, s := range r.Subscriptions {
		st := subscriptionStatus(s.State)
		isLive := st != catalog.StatusCanceled
		switch {
		case live && !isLive:
			continue
		case isLive && !live, !found, s.At.After(latest.At), s.At.Equal(latest.At) && worse(st, latest.State):
			latest, found, live = stamped{State: st, At: s.At}, true, isLive
		}
	}
	if found {
		out = append(out, latest.State)
	}
	return out
}

// handleWebhook serves POST /v1/billing/webhook.
func (a *api) handleWebhook(w http.ResponseWriter, r *http.Request) {
	if a.webhookSecret == "" {
		a.m.webhooks.WithLabelValues(webhookDisabled).Inc()
		schemas.NewProblem(schemas.ProblemNotFound, "the billing webhook is disabled: no webhook secret is configured").Write(w)
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxWebhookBody))
	if err != nil {
		a.m.webhooks.WithLabelValues(webhookMalformed).Inc()
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			schemas.NewProblem(schemas.ProblemBodyTooLarge, "the webhook body exceeds 1 MiB").Write(w)
			return
		}
		schemas.NewProblem(schemas.ProblemMalformedBody, "reading the body: "+err.Error()).Write(w)
		return
	}
	if err := VerifySignature(r.Header.Get(StripeSignatureHeader), body, a.webhookSecret, a.now(), a.webhookTolerance); err != nil {
		a.m.webhooks.WithLabelValues(webhookInvalidSignature).Inc()
		a.log.Warn("billing webhook refused", "err", err, "remote", r.RemoteAddr)
		schemas.NewProblem(schemas.ProblemInvalidSignature, "invalid signature: "+strings.TrimPrefix(err.Error(), "enforcer: ")).Write(w)
		return
	}
	ev, eff, known, err := decodeEvent(body)
	switch {
	case err != nil:
		a.m.webhooks.WithLabelValues(webhookMalformed).Inc()
		schemas.NewProblem(schemas.ProblemMalformedBody, err.Error()).Write(w)
		return
	case !known:
		a.m.webhooks.WithLabelValues(webhookIgnored).Inc()
		writeJSON(w, http.StatusOK, webhookAnswer{Status: webhookIgnored, Event: ev.ID, Detail: "event type " + ev.Type + " is not used by meterd"})
		return
	}
	customer := ev.customer()
	tenant, ok := a.watch.Catalog().TenantByCustomer(customer)
	if !ok {
		// 2xx: Stripe would retry an error for days, and no retry can
		// make an unknown customer known. Counted, and logged.
		a.m.webhooks.WithLabelValues(webhookUnknownCustomer).Inc()
		a.log.Warn("billing webhook for a customer no tenant has", "customer", customer, "event_id", ev.ID, "type", ev.Type)
		writeJSON(w, http.StatusAccepted, webhookAnswer{Status: webhookUnknownCustomer, Event: ev.ID,
			Detail: fmt.Sprintf("no tenant has customer_id %q; the event was not applied", customer)})
		return
	}
	kv := a.open.Load()
	if kv == nil {
		a.m.webhooks.WithLabelValues(webhookUnavailable).Inc()
		unavailable(w, "the enforcer is starting")
		return
	}
	dup, err := a.billing.record(r.Context(), kv.billing, tenant, ev, eff)
	if err != nil {
		a.m.webhooks.WithLabelValues(webhookUnavailable).Inc()
		a.log.Error("billing webhook not stored", "err", err, "tenant", tenant, "event_id", ev.ID)
		unavailable(w, "the billing state could not be stored; retry")
		return
	}
	outcome := webhookApplied
	if dup {
		outcome = webhookDuplicate
	}
	a.m.webhooks.WithLabelValues(outcome).Inc()
	// The decision is written before the answer, so a 200 means the
	// gateways are being told; a failure here is retried by the writer.
	if err := a.pub.sync(r.Context(), tenant, time.Time{}); err != nil {
		a.log.Warn("blocklist write after a billing webhook failed; retrying", "err", err, "tenant", tenant, "event_id", ev.ID)
	}
	status := a.billing.status(a.watch.Catalog(), tenant)
	a.log.Info("billing webhook", "outcome", outcome, "event_id", ev.ID, "type", ev.Type, "tenant", tenant, "billing_status", status)
	writeJSON(w, http.StatusOK, webhookAnswer{Status: outcome, Event: ev.ID, Tenant: tenant, BillingStatus: status})
}

// webhookAnswer is the body of a 2xx answer to a webhook.
type webhookAnswer struct {
	Status        string `json:"status"`
	Event         string `json:"event"`
	Tenant        string `json:"tenant,omitempty"`
	BillingStatus string `json:"billing_status,omitempty"`
	Detail        string `json:"detail,omitempty"`
}

// maxUpdateAttempts bounds the optimistic-concurrency retries of one update
// of a tenant's billing record.
const maxUpdateAttempts = 16

// record applies ev to tenant's billing record in the bucket with
// compare-and-set on the record's revision, so concurrent webhooks never
// lose an update, then to the enforcer's copy. dup reports an event id the
// record already holds: nothing changes.
func (b *billing) record(ctx context.Context, kv jetstream.KeyValue, tenant string, ev *billingEvent, eff eventEffect) (dup bool, err error) {
	at := time.Unix(ev.Created, 0).UTC()
	for range maxUpdateAttempts {
		var rec billingRecord
		var rev uint64
		entry, err := kv.Get(ctx, tenant)
		switch {
		case err == nil:
			rev = entry.Revision()
			if err := json.Unmarshal(entry.Value(), &rec); err != nil {
				// Keep going from an empty record rather than wedge the
				// tenant; the bad value is replaced.
				b.log.Error("malformed billing record replaced", "tenant", tenant, "err", err)
				rec = billingRecord{}
			}
		case errors.Is(err, jetstream.ErrKeyNotFound):
		default:
			return false, fmt.Errorf("read billing record of %s: %w", tenant, err)
		}
		if rec.seen(ev.ID) {
			b.set(tenant, rec, rev)
			return true, nil
		}
		rec.apply(ev.ID, eff, ev.Data.Object.ID, at)
		data, err := json.Marshal(rec)
		if err != nil {
			return false, err
		}
		newRev, err := kv.Update(ctx, tenant, data, rev)
		if errors.Is(err, jetstream.ErrKeyRevisionMismatch) || errors.Is(err, jetstream.ErrKeyExists) {
			continue // someone else updated it first: read again
		}
		if err != nil {
			return false, fmt.Errorf("write billing record of %s: %w", tenant, err)
		}
		b.set(tenant, rec, newRev)
		return false, nil
	}
	return false, fmt.Errorf("billing record of %s: still contended after %d attempts", tenant, maxUpdateAttempts)
}

// writeJSON answers status with v as JSON.
func writeJSON(w http.ResponseWriter, status int, v any) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		schemas.NewProblem(schemas.ProblemInternal, "encoding the answer failed").Write(w)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	w.Write(buf.Bytes())
}

// billing holds every tenant's billing record, as the KV bucket
// meterd-billing holds it, for the decisions. Its lock is taken under the
// tracker's (decide) and takes the dirty set's.
type billing struct {
	blockOn map[string]bool // Config.BlockOn
	log     *slog.Logger
	dirty   *dirtySet

	mu         sync.Mutex
	records    map[string]billingRecord
	recordRevs map[string]uint64
}

func newBilling(blockOn []string, log *slog.Logger, dirty *dirtySet) *billing {
	b := &billing{blockOn: map[string]bool{}, log: log, dirty: dirty,
		records: map[string]billingRecord{}, recordRevs: map[string]uint64{}}
	for _, st := range blockOn {
		b.blockOn[st] = true
	}
	return b
}

// set makes rec, of revision rev, tenant's billing record unless a newer
// one is held (the enforcer's own writes come back through the watch), and
// has the tenant decided again.
func (b *billing) set(tenant string, rec billingRecord, rev uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if rev <= b.recordRevs[tenant] {
		return
	}
	b.recordRevs[tenant] = rev
	b.records[tenant] = rec
	b.dirty.mark(tenant, time.Time{})
}

// apply applies an entry of the billing bucket.
func (b *billing) apply(en jetstream.KeyValueEntry) {
	deleted := en.Operation() == jetstream.KeyValueDelete || en.Operation() == jetstream.KeyValuePurge
	var rec billingRecord
	if !deleted {
		if err := json.Unmarshal(en.Value(), &rec); err != nil {
			b.log.Error("malformed billing record in the bucket ignored", "tenant", en.Key(), "err", err)
			return
		}
	}
	b.set(en.Key(), rec, en.Revision())
}

// follow applies the updates of the billing bucket's watch, past its
// initial values, until ctx ends.
func (b *billing) follow(ctx context.Context, w jetstream.KeyWatcher) {
	defer w.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case en, ok := <-w.Updates():
			if !ok {
				if ctx.Err() == nil {
					b.log.Error("the billing bucket's watch ended; webhooks received by other enforcers are no longer seen")
				}
				return
			}
			if en != nil {
				b.apply(en)
			}
		}
	}
}

// status is tenant's billing status in cat, blocking or not.
func (b *billing) status(cat *catalog.Catalog, tenant string) string {
	t, _, _ := cat.Tenant(tenant)
	return b.worstStatus(tenant, t.Status, false)
}

// worstStatus is the worst of tenant's configured status and the statuses
// of its billing record, among those that block when blocking.
func (b *billing) worstStatus(tenant, configured string, blocking bool) string {
	b.mu.Lock()
	rec := b.records[tenant] // replaced, never changed: read without the lock
	b.mu.Unlock()
	worst := catalog.StatusActive
	for _, st := range append([]string{configured}, rec.statuses()...) {
		if (!blocking || b.blockOn[st]) && worse(st, worst) {
			worst = st
		}
	}
	return worst
}
