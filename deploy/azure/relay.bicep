// The pluresync relay on Azure App Service (Web App for Containers, Linux).
//
//   az group create -n RG -l LOCATION
//   az deployment group create -g RG --template-file deploy/azure/relay.bicep \
//     --parameters @deploy/azure/relay.parameters.json
//
// App Service terminates TLS on 443 and forwards WebSocket upgrades over
// HTTP/1.1 to the container's plain port 8080 (WEBSITES_PORT). A site named
// `pluresdb-relay` gets https://pluresdb-relay.azurewebsites.net, the URL the
// clients' built-in `relay:azure` / `auto:` alias already uses.
// Step by step, and why App Service rather than Container Apps: docs/deploy.md.

@description('Site name: the relay is wss://NAME.azurewebsites.net (globally unique).')
@minLength(2)
@maxLength(60)
param name string = 'pluresdb-relay'

@description('Azure region (default: the resource group\'s).')
param location string = resourceGroup().location

@description('Container image, e.g. myregistry.azurecr.io/pluresync-relay:0.1.0 (built from deploy/Dockerfile).')
param image string

@description('Azure Container Registry (same resource group) that holds the image; the site pulls with a managed identity (AcrPull). Empty: the image is public.')
param acrName string = ''

@description('App Service plan SKU. Always On needs B1 or above; WebSockets per instance: B1 350, S1/P0v3/P1v3 unlimited.')
param sku string = 'S1'

// Exactly one instance until cross-instance pairing (through Redis) lands in
// a later release: a listener and its connector must reach the SAME relay
// process to be paired, and two instances behind the load balancer would
// split them ("no-listener"). Raise maxValue only together with that release.
@description('Instances at least. Must be 1 until cross-instance pairing (Redis) lands.')
@minValue(1)
@maxValue(1)
param minReplicas int = 1

@description('Instances at most. Must be 1 until cross-instance pairing (Redis) lands.')
@minValue(1)
@maxValue(1)
param maxReplicas int = 1

@description('Extra arguments after `twist pluresync-relay --port tcp:8080`, e.g. "--max-connections 20000". Empty: the image\'s CMD.')
param relayArgs string = ''

@description('Tags for every resource.')
param tags object = {
  app: 'pluresync-relay'
}

var useAcr = !empty(acrName)
// AcrPull, a built-in role.
var acrPullRoleId = subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '7f951dda-4ed3-4680-a7ca-43fe172d538d')

resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' existing = if (useAcr) {
  name: acrName
}

resource pullIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = if (useAcr) {
  name: '${name}-pull'
  location: location
  tags: tags
}

// Granted before the site exists, so the first image pull already works.
resource acrPull 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (useAcr) {
  name: guid(resourceGroup().id, acrName, '${name}-pull', 'AcrPull')
  scope: registry
  properties: {
    roleDefinitionId: acrPullRoleId
    principalId: pullIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource plan 'Microsoft.Web/serverfarms@2023-12-01' = {
  name: '${name}-plan'
  location: location
  tags: tags
  kind: 'linux'
  sku: {
    name: sku
    capacity: minReplicas
  }
  properties: {
    reserved: true // Linux
  }
}

resource site 'Microsoft.Web/sites@2023-12-01' = {
  name: name
  location: location
  tags: tags
  kind: 'app,linux,container'
  identity: useAcr ? {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${pullIdentity.id}': {}
    }
  } : null
  properties: {
    serverFarmId: plan.id
    httpsOnly: true // plain http:// is redirected; clients use wss://
    clientAffinityEnabled: false
    siteConfig: {
      linuxFxVersion: 'DOCKER|${image}'
      appCommandLine: empty(relayArgs) ? '' : 'twist pluresync-relay --port tcp:8080 ${relayArgs}'
      acrUseManagedIdentityCreds: useAcr
      acrUserManagedIdentityID: useAcr ? pullIdentity.properties.clientId : null
      webSocketsEnabled: true
      alwaysOn: true // never unload the relay: listeners stay connected for hours
      healthCheckPath: '/health' // liveness and readiness: see docs/deploy.md
      http20Enabled: false // WebSocket upgrades need HTTP/1.1 end to end
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
      appSettings: [
        {
          name: 'WEBSITES_PORT' // the container listens on 8080 (deploy/Dockerfile)
          value: '8080'
        }
        {
          name: 'WEBSITES_ENABLE_APP_SERVICE_STORAGE'
          value: 'false'
        }
        {
          name: 'WEBSITES_CONTAINER_START_TIME_LIMIT'
          value: '120'
        }
        {
          name: 'WEBSITE_HEALTHCHECK_MAXPINGFAILURES' // /health failures before an instance is taken out
          value: '2'
        }
      ]
    }
  }
  dependsOn: [
    acrPull
  ]
}

@description('The relay, for clients: relay:url=wss\\://HOST or auto:azure=wss\\://HOST.')
output url string = 'wss://${site.properties.defaultHostName}'

@description('GET it for the health JSON.')
output healthUrl string = 'https://${site.properties.defaultHostName}/health'

@description('Instances the plan runs (1 until cross-instance pairing lands).')
output replicas int = maxReplicas
