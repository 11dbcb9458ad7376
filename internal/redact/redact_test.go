package redact

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"strings"
	"testing"
)

func TestUserinfo(t *testing.T) {
	tests := []struct{ in, want string }{
		{"nats://127.0.0.1:4222", "nats://127.0.0.1:4222"},
		{"nats://meterd:s3cret@nats:4222", "nats://xxxxx@nats:4222"},
		{"nats://a:b@h1:4222,nats://c:d@h2:4222", "nats://xxxxx@h1:4222,nats://xxxxx@h2:4222"},
		{`parse "nats://u:pa/ss@host:bad": invalid port`, `parse "nats://xxxxx@host:bad": invalid port`},
		{"clickhouse://default:pw@ch:9000/meterd?dial_timeout=1s", "clickhouse://xxxxx@ch:9000/meterd?dial_timeout=1s"},
		{"mail me at ops@example.com", "mail me at ops@example.com"},
		{"https://token@hooks.example.com/x and https://h/y", "https://xxxxx@hooks.example.com/x and https://h/y"},
	}
	for _, tt := range tests {
		if got := Userinfo(tt.in); got != tt.want {
			t.Errorf("Userinfo(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestOriginAndPassword(t *testing.T) {
	if got := Origin("https://u:p@hooks.slack.com/services/T0/B0/XXXX?x=1"); got != "https://hooks.slack.com" {
		t.Errorf("Origin = %q", got)
	}
	if got := Origin("::"); got != "(unparseable URL)" {
		t.Errorf("Origin of garbage = %q", got)
	}
	if got := Password("clickhouse://meterd:dsn-pass@ch:9000/db"); got != "dsn-pass" {
		t.Errorf("Password = %q", got)
	}
	if got := Password("clickhouse://ch:9000/db"); got != "" {
		t.Errorf("Password without one = %q", got)
	}
}

func TestRedactorError(t *testing.T) {
	r := New("whsec_0123456789", "short")
	err := r.Error(fmt.Errorf("verify with whsec_0123456789 (short): %w", fs.ErrNotExist))
	if got := err.Error(); got != "verify with xxxxx (short): file does not exist" {
		t.Errorf("Error() = %q", got)
	}
	if !errors.Is(err, fs.ErrNotExist) {
		t.Error("the redacted error lost its chain")
	}
	if r.Error(nil) != nil {
		t.Error("Error(nil) != nil")
	}
}

type stringer struct{ s string }

func (s stringer) String() string { return s.s }

func TestHandler(t *testing.T) {
	const key = "mk_live_0123456789abcdef"
	var buf bytes.Buffer
	r := New(key, "whsec_0123456789")
	log := slog.New(r.Handler(slog.NewJSONHandler(&buf, nil))).With("nats", "nats://u:natspass@h:4222")
	log.WithGroup("g").Info("key "+key+" seen",
		"err", errors.New("signature by whsec_0123456789 invalid"),
		"any", stringer{"Bearer " + key},
		"list", []string{"a", "b"},
		"n", 42,
		slog.Group("inner", "dsn", "clickhouse://meterd:chpass1234@ch:9000/db"))
	out := buf.String()
	for _, secret := range []string{key, "whsec_0123456789", "natspass", "chpass1234"} {
		if strings.Contains(out, secret) {
			t.Errorf("log holds %q: %s", secret, out)
		}
	}
	for _, want := range []string{`"msg":"key xxxxx seen"`, `"nats":"nats://xxxxx@h:4222"`, `"list":["a","b"]`, `"n":42`,
		`"err":"signature by xxxxx invalid"`, `"dsn":"clickhouse://xxxxx@ch:9000/db"`} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %s: %s", want, out)
		}
	}
}
