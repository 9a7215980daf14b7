package lab

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"strconv"
	"strings"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// Command sends a bridge command ("!wh " is added) from the wedged device in the world's room (the
// portal, or the management room) and returns the text of the bot's answer that contains want.
func (w *World) Command(ctx context.Context, command, want string) (string, error) {
	return w.CommandIn(ctx, w.Room, command, want)
}

// CommandIn is Command in another room of the wedged device's, e.g. one from ManagementRoom.
func (w *World) CommandIn(ctx context.Context, room id.RoomID, command, want string) (string, error) {
	seen := map[id.EventID]bool{}
	for _, evt := range w.Wedged().Messages(room) {
		seen[evt.ID] = true
	}
	if _, err := w.Wedged().SendText(ctx, room, "!wh "+command); err != nil {
		return "", err
	}
	evt, err := w.Wedged().WaitForMessage(ctx, room, func(evt *event.Event) bool {
		msg := evt.Content.AsMessage()
		return !seen[evt.ID] && evt.Sender == w.Bridge.BotMXID && msg.MsgType == event.MsgNotice && strings.Contains(msg.Body, want)
	})
	if err != nil {
		return "", fmt.Errorf("no answer to %q containing %q: %w", command, want, err)
	}
	return evt.Content.AsMessage().Body, nil
}

// ManagementRoom opens the user's encrypted management room with the bridge bot from the wedged
// device, as openManagementRoom does for a Management scenario, for the commands that answer only
// there (`unwedge`); the world's room stays what it is.
func (w *World) ManagementRoom(ctx context.Context) (id.RoomID, error) {
	room, err := w.Wedged().CreateEncryptedRoom(ctx, w.Bridge.BotMXID)
	if err != nil {
		return "", err
	}
	_, err = w.Wedged().WaitForMessage(ctx, room, func(evt *event.Event) bool {
		return evt.Sender == w.Bridge.BotMXID && strings.Contains(evt.Content.AsMessage().Body, "marked as your management room")
	})
	if err != nil {
		return "", fmt.Errorf("the bot's welcome in the management room: %w", err)
	}
	return room, nil
}

// Metrics reads the bridge's unwedge metrics: series ("name{labels}") to value.
func (w *World) Metrics(ctx context.Context) (map[string]float64, error) {
	if w.Bridge.MetricsURL == "" {
		return nil, fmt.Errorf("the bridge serves no metrics in this mode")
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, w.Bridge.MetricsURL, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("metrics: HTTP %d", resp.StatusCode)
	}
	return ParseMetrics(bufio.NewScanner(resp.Body))
}

// ParseMetrics reads the Prometheus text format: one "series value" per line, comments skipped.
func ParseMetrics(scanner *bufio.Scanner) (map[string]float64, error) {
	out := map[string]float64{}
	for scanner.Scan() {
		line := strings.TrimSpace(scanner.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		at := strings.LastIndexByte(line, ' ')
		if at < 0 {
			return nil, fmt.Errorf("bad metrics line %q", line)
		}
		value, err := strconv.ParseFloat(line[at+1:], 64)
		if err != nil {
			return nil, fmt.Errorf("bad metrics line %q: %w", line, err)
		}
		out[line[:at]] = value
	}
	return out, scanner.Err()
}
