{{/* The prefix of every object's name: "lameduck" for a release named lameduck. */}}
{{- define "lameduck.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "lameduck.webhookName" -}}
{{- printf "%s-webhook" (include "lameduck.fullname" .) -}}
{{- end -}}

{{/* The labels k8s/webhook sets, which also select the webhook's pods. */}}
{{- define "lameduck.selectorLabels" -}}
app.kubernetes.io/name: lameduck-webhook
{{- end -}}

{{- define "lameduck.labels" -}}
{{ include "lameduck.selectorLabels" . }}
{{ include "lameduck.commonLabels" . }}
{{- end -}}

{{/* Every object's labels: k8s/'s app.kubernetes.io/part-of and Helm's own. */}}
{{- define "lameduck.commonLabels" -}}
app.kubernetes.io/part-of: lameduck
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The image, set once: the webhook's, and the sidecar's unless sidecar.image is set. */}}
{{- define "lameduck.image" -}}
{{- if and (eq .Values.image.repository "ghcr.io/lameduck/lameduck") (not .Values.image.allowPlaceholder) -}}
{{- fail "image.repository is ghcr.io/lameduck/lameduck, a placeholder: no lameduck image is published there yet. Build and push the image (README, Install), then set image.repository to it, e.g. --set image.repository=123456789012.dkr.ecr.eu-west-1.amazonaws.com/lameduck" -}}
{{- end -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{- define "lameduck.sidecarImage" -}}
{{- .Values.sidecar.image | default (include "lameduck.image" .) -}}
{{- end -}}

{{- define "lameduck.tlsSecretName" -}}
{{- if eq .Values.tls.source "secret" -}}
{{- .Values.tls.secret.name | default (printf "%s-tls" (include "lameduck.webhookName" .)) -}}
{{- else -}}
{{- printf "%s-tls" (include "lameduck.webhookName" .) -}}
{{- end -}}
{{- end -}}
