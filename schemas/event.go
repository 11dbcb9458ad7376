// Package schemas holds the contracts every meterd component shares: the usage
// event and batch, their validation rules and wire encodings, the NATS names,
// the enforcement decision and the problem+json error body (docs/architecture.md#contracts).
package schemas

import (
	"strconv"
	"time"
	"unicode/utf8"
)

// Limits of the usage event (docs/architecture.md#usage-event).
const (
	MaxIDLen             = 128
	MaxTenantLen         = 128
	MaxMeterLen          = 64
	MaxDimensions        = 16
	MaxDimensionKeyLen   = 64
	MaxDimensionValueLen = 256
	// MaxValue is the largest value of one event (2^32 − 1, a UInt32). Any
	// larger quantity is metered in a coarser unit (KiB, milliseconds). It
	// keeps every total far from int64's range: 2^31 events of MaxValue in
	// one window before a sum could reach 2^63, and the totals that could
	// still get there saturate instead of wrapping.
	MaxValue = 1<<32 - 1
	// MaxFuture is how far in the future an event time may lie.
	MaxFuture = 5 * time.Minute
	// DefaultMaxAge is the default late-event bound.
	DefaultMaxAge = 35 * 24 * time.Hour
)

// unixEpoch is the earliest time a store holds (seconds since 1970 as an
// unsigned number: aggregator.MinEventTime).
var unixEpoch = time.Unix(0, 0)

// Event is one usage event: value units of meter used by tenant at time.
// The pair (Tenant, ID) is the idempotency key: it counts once, however often
// it is sent.
type Event struct {
	ID         string            `json:"id"`
	Tenant     string            `json:"tenant"`
	Meter      string            `json:"meter"`
	Value      int64             `json:"value"`
	Time       time.Time         `json:"time"`
	Dimensions map[string]string `json:"dimensions,omitempty"`
}

// FieldError says what is wrong with one field of one event of a request.
type FieldError struct {
	Index   int    `json:"index"`
	Field   string `json:"field"`
	Message string `json:"message"`
}

// Error implements error.
func (e FieldError) Error() string {
	return "event " + strconv.Itoa(e.Index) + ": " + e.Field + ": " + e.Message
}

// Window bounds the accepted event times around the receive time Now. The
// zero Window checks no bounds (used for batches, bounded at ingest).
type Window struct {
	Now    time.Time
	MaxAge time.Duration // 0 => DefaultMaxAge
}

// Validate appends to errs every rule of docs/architecture.md#usage-event that e breaks, tagged
// with index, and returns the extended slice. An event with an empty Tenant
// fails: the caller fills the tenant from the API key before validating.
// A zero Time is not checked here: the collector stamps the receive time.
func (e *Event) Validate(index int, w Window, errs []FieldError) []FieldError {
	bad := func(field, msg string) {
		errs = append(errs, FieldError{Index: index, Field: field, Message: msg})
	}
	if n := utf8.RuneCountInString(e.ID); n == 0 {
		bad("id", "is required")
	} else if n > MaxIDLen {
		bad("id", "must be at most 128 characters")
	}
	if e.Tenant == "" {
		bad("tenant", "is required")
	} else if !ValidTenant(e.Tenant) {
		bad("tenant", "must be "+TenantGrammar)
	}
	if e.Meter == "" {
		bad("meter", "is required")
	} else if !ValidMeter(e.Meter) {
		bad("meter", "must match "+MeterGrammar)
	}
	if e.Value < 0 {
		bad("value", "must be a non-negative integer")
	} else if e.Value > MaxValue {
		bad("value", "must be at most "+strconv.Itoa(MaxValue)+"; meter large quantities in a coarser unit")
	}
	if y := e.Time.Year(); y < 0 || y > 9999 {
		// An offset can move 0000-01-01 or 9999-12-31 out of the years
		// RFC 3339 (and so EncodeBatch) can write.
		bad("time", "must lie in the years 0000 to 9999 in UTC")
	} else if !e.Time.IsZero() && !w.Now.IsZero() {
		maxAge := w.MaxAge
		if maxAge <= 0 {
			maxAge = DefaultMaxAge
		}
		if e.Time.After(w.Now.Add(MaxFuture)) {
			bad("time", "is more than 5m in the future")
		} else if e.Time.Before(w.Now.Add(-maxAge)) {
			bad("time", "is older than the late-event bound of "+maxAge.String())
		} else if e.Time.Before(unixEpoch) {
			// Only a late-event bound of more than 56 years gets here.
			bad("time", "must not be before 1970-01-01T00:00:00Z: stores hold times from then on")
		}
	}
	if len(e.Dimensions) > MaxDimensions {
		bad("dimensions", "must have at most 16 keys")
	}
	for k, v := range e.Dimensions {
		if !ValidDimensionKey(k) {
			bad("dimensions."+k, "key must match "+DimensionKeyGrammar)
		} else if utf8.RuneCountInString(v) > MaxDimensionValueLen {
			bad("dimensions."+k, "value must be at most 256 characters")
		}
	}
	return errs
}

// The grammars of names, as error messages state them.
const (
	TenantGrammar       = "1-128 of A-Z a-z 0-9 . _ - with no leading, trailing or double dot"
	MeterGrammar        = "[a-z][a-z0-9_]{0,63}"
	DimensionKeyGrammar = "[A-Za-z_][A-Za-z0-9_.-]{0,63}"
)

// ValidTenant reports whether s is a tenant name: 1 to 128 of
// [A-Za-z0-9._-] with no leading, trailing or double dot, so that it is a
// valid JetStream KV key (the blocklist's key of the tenant: a name that is
// not could never be blocked) and NATS subject token sequence.
func ValidTenant(s string) bool {
	if len(s) == 0 || len(s) > MaxTenantLen || s[0] == '.' || s[len(s)-1] == '.' {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(isAlnum(c) || c == '.' || c == '_' || c == '-') || (c == '.' && s[i-1] == '.') {
			return false
		}
	}
	return true
}

// ValidMeter reports whether s is a meter name: [a-z][a-z0-9_]{0,63}.
func ValidMeter(s string) bool {
	if len(s) == 0 || len(s) > MaxMeterLen || s[0] < 'a' || s[0] > 'z' {
		return false
	}
	for i := 1; i < len(s); i++ {
		c := s[i]
		if !((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_') {
			return false
		}
	}
	return true
}

// ValidDimensionKey reports whether s is a dimension name:
// [A-Za-z_][A-Za-z0-9_.-]{0,63}. Reports use it as a column name.
func ValidDimensionKey(s string) bool {
	if len(s) == 0 || len(s) > MaxDimensionKeyLen {
		return false
	}
	if c := s[0]; !(isAlpha(c) || c == '_') {
		return false
	}
	for i := 1; i < len(s); i++ {
		c := s[i]
		if !(isAlnum(c) || c == '_' || c == '.' || c == '-') {
			return false
		}
	}
	return true
}

func isAlpha(c byte) bool { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') }
func isAlnum(c byte) bool { return isAlpha(c) || (c >= '0' && c <= '9') }
