package gate

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/meterd/meterd/schemas"
)

// ReasonStale is the reason of the block a stale gate answers with under the
// Deny policy: the gate cannot tell whether the tenant is blocked.
const ReasonStale schemas.Reason = "stale"

// Verdict is the answer of Check.
type Verdict struct {
	// Block is nil when the request may pass. Otherwise it holds the
	// prerendered answer; it is shared and must not be modified.
	Block *Block
	// Stale is true when the gate has received no decision nor heartbeat
	// for longer than Config.StaleAfter: the verdict comes from old data or,
	// for tenants the gate holds no decision for, from Config.StalePolicy.
	Stale bool
}

// Block is a tenant's block with its HTTP answer rendered once, when the
// decision arrived, so answering costs no encoding. A Block is immutable
// and shared by every caller: never modify it or the slices it holds.
type Block struct {
	// Decision is the enforcer's decision. For the stale block (reason
	// ReasonStale) only Reason is set.
	Decision schemas.Decision
	// Status is the HTTP status to answer with: 402 for a decision, 503 for
	// the stale block.
	Status int
	// Problem is the application/problem+json body (RFC 9457) of
	// docs/architecture.md#http-apis: type, title, status, detail, reason, tenant, meter, limit, used,
	// period_end and billing_url (members without a value are left out).
	Problem []byte
	// Link is the value of the Link header, `<billing_url>; rel="payment"`,
	// or "" when the decision has no billing URL.
	Link string
	// staleRetryAfter is the Retry-After of the stale block, in seconds.
	staleRetryAfter int64
}

// RetryAfter returns the seconds until the end of the quota period (rounded
// up, at least 1) for the Retry-After header, and for the stale block (a
// 503) the time in which a gate usually hears from the enforcer again. ok is
// false when retrying later does not help by itself: unpaid and suspended
// tenants, and a quota without a period end.
func (b *Block) RetryAfter(now time.Time) (seconds int64, ok bool) {
	d := b.Decision
	if d.Reason == ReasonStale {
		return b.staleRetryAfter, true
	}
	if d.Reason != schemas.ReasonQuotaExceeded || d.PeriodEnd.IsZero() {
		return 0, false
	}
	left := d.PeriodEnd.Sub(now)
	if left <= 0 {
		return 1, true
	}
	seconds = int64(left / time.Second)
	if left%time.Second != 0 {
		seconds++
	}
	return seconds, true
}

// Write sends the block as the response: Content-Type
// application/problem+json, Retry-After and Link when they apply, Status and
// Problem. It is the answer of docs/architecture.md#http-apis; headers the caller set are kept.
func (b *Block) Write(w http.ResponseWriter, now time.Time) {
	h := w.Header()
	if s, ok := b.RetryAfter(now); ok {
		h.Set("Retry-After", strconv.FormatInt(s, 10))
	}
	if b.Link != "" {
		h.Add("Link", b.Link)
	}
	schemas.WriteRendered(w, b.Status, b.Problem)
}

// decodeDecision decodes and checks the value of a tenant's key. A value
// this returns an error for is ignored: rendering it would produce a
// misleading answer (wrong tenant, unknown reason, a Link header that could
// be forged).
func decodeDecision(key string, value []byte) (schemas.Decision, error) {
	var d schemas.Decision
	if !schemas.ValidTenant(key) {
		return d, errors.New("key is not a tenant name")
	}
	if err := json.Unmarshal(value, &d); err != nil {
		return d, fmt.Errorf("decode decision: %w", err)
	}
	if d.Tenant != key {
		return d, fmt.Errorf("decision for tenant %q under key %q", d.Tenant, key)
	}
	if _, ok := schemas.ReasonProblem(d.Reason); !ok {
		return d, fmt.Errorf("unknown reason %q", d.Reason)
	}
	if d.Limit < 0 || d.Used < 0 {
		return d, errors.New("negative limit or used")
	}
	if d.Reason == schemas.ReasonQuotaExceeded && d.Meter == "" {
		return d, errors.New("quota_exceeded without a meter")
	}
	if d.BillingURL != "" {
		if err := checkBillingURL(d.BillingURL); err != nil {
			return d, err
		}
	}
	return d, nil
}

// checkBillingURL accepts absolute http(s) URLs that can stand between the
// angle brackets of a Link header.
func checkBillingURL(s string) error {
	if strings.ContainsFunc(s, func(r rune) bool { return r <= ' ' || r == 0x7f || r == '<' || r == '>' || r == '"' }) {
		return fmt.Errorf("billing_url %q holds a character not allowed in a Link header", s)
	}
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("billing_url: %w", err)
	}
	if (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return fmt.Errorf("billing_url %q is not an absolute http(s) URL", s)
	}
	return nil
}

// newBlock renders the answer to a decision decodeDecision accepted. It
// fails only for times JSON cannot hold (a period end past year 9999 in UTC).
func newBlock(d schemas.Decision) (*Block, error) {
	t, _ := schemas.ReasonProblem(d.Reason) // decodeDecision checked the reason
	p := schemas.NewProblem(t, d.Detail())
	p.Block = &schemas.Block{Reason: d.Reason, Tenant: d.Tenant, Meter: d.Meter, BillingURL: d.BillingURL}
	if d.Reason == schemas.ReasonQuotaExceeded {
		p.Block.Limit, p.Block.Used = &d.Limit, &d.Used
	}
	if !d.PeriodEnd.IsZero() {
		end := d.PeriodEnd.UTC()
		p.Block.PeriodEnd = &end
	}
	body, err := p.Render()
	if err != nil {
		return nil, err
	}
	b := &Block{Decision: d, Status: p.Status, Problem: body}
	if d.BillingURL != "" {
		b.Link = "<" + d.BillingURL + `>; rel="payment"`
	}
	return b, nil
}

// newStaleBlock is the block a stale gate under the Deny policy answers for
// tenants it holds no decision for: 503, because the gate does not know
// whether the tenant owes anything.
func newStaleBlock(staleAfter time.Duration) *Block {
	p := schemas.NewProblem(schemas.ProblemBlocklistStale,
		fmt.Sprintf("the blocklist has had no update from the enforcer for more than %s; "+
			"requests are denied until it is current again.", staleAfter))
	p.Block = &schemas.Block{Reason: ReasonStale}
	body, _ := p.Render() // strings and an int always encode
	// StaleAfter spans a few heartbeats: once the enforcer is back, the gate
	// is current again within about a third of it.
	retry := max(int64((staleAfter/3+time.Second-1)/time.Second), 1)
	return &Block{Decision: schemas.Decision{Reason: ReasonStale}, Status: p.Status, Problem: body, staleRetryAfter: retry}
}
