{{- define "kvpilot.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kvpilot.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kvpilot.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kvpilot.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kvpilot.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kvpilot.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* What the operator does inside a watched namespace (or everywhere). Keep in step with
     operator/kube.py KINDS and the handlers' watches. */}}
{{- define "kvpilot.namespacedRules" -}}
- apiGroups: [kvpilot.io]
  resources: [llmservices]
  verbs: [get, list, watch, patch]
- apiGroups: [kvpilot.io]
  resources: [workerpools]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [kvpilot.io]
  resources: [llmservices/status, workerpools/status]
  verbs: [get, patch]
- apiGroups: [kvpilot.io]
  resources: [llmservices/finalizers, workerpools/finalizers]
  verbs: [update]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch]
- apiGroups: [""]
  resources: [services, configmaps]
  verbs: [get, list, watch, create, patch]
# The router's admin token: created once, never read back.
- apiGroups: [""]
  resources: [secrets]
  verbs: [create]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch]
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get, create, patch]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, create, patch]
# Routers read pods to find engines; the operator can only grant what it holds itself.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
# engine ray-serve: the LLMService's RayService (KubeRay makes the Ray cluster from it); delete only
# after a switch to another engine, otherwise garbage collection removes it with its LLMService.
# Listed every few seconds, never watched (kvpilot.operator.listed).
- apiGroups: [ray.io]
  resources: [rayservices]
  verbs: [get, list, create, patch, delete]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- if .Values.metrics.podMonitors }}
# Server-side apply only; garbage collection deletes them with their LLMService.
- apiGroups: [monitoring.coreos.com]
  resources: [podmonitors]
  verbs: [create, patch]
{{- end }}
{{- if and .Values.peering.enabled .Values.watchNamespaces }}
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
{{- end -}}

{{- define "kvpilot.peeringName" -}}
{{- default (include "kvpilot.fullname" .) .Values.peering.name -}}
{{- end -}}

{{- define "kvpilot.autoscalerSelectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: autoscaler
{{- end -}}

{{- define "kvpilot.autoscalerLabels" -}}
{{ include "kvpilot.autoscalerSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
